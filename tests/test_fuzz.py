"""Property-based tests: whatever keys, values or bytes come in, the parser and the adapter
readers either succeed or raise lora-booth's own clear errors, never anything else."""
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_booth.config import sections as config
from lora_booth.config import loading
from lora_booth.config import checks
from lora_booth.config import keys
from lora_booth.adapters import formats
from lora_booth.adapters import neutral
from lora_booth.adapters import kohya_layout
from lora_booth.io.errors import ConfigError

KEYS = st.one_of(st.sampled_from(keys.all_keys() + list(config.ALIASES)),
                 st.text(alphabet=string.ascii_lowercase + "._-", min_size=1, max_size=20))
VALUES = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(str), st.sampled_from(["true", "no", "", "none"]))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_config_parser_only_raises_config_errors(pairs):
    base = {"instance_dir": "photos", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
            "output_dir": "out"}
    try:
        cfg, _ = loading.resolve({**base, **pairs})
    except ConfigError as error:
        assert str(error)
    else:
        checks.validate(cfg, {})  # whatever was accepted is consistent


SEGMENTS = st.one_of(st.sampled_from(["down_blocks", "up_blocks", "mid_block", "attentions", "resnets",
                                      "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out",
                                      "proj_in", "proj_out", "ff", "net", "conv1", "time_emb_proj", "self_attn",
                                      "q_proj", "out_proj", "mlp", "fc1", "layers", "encoder"]),
                     st.integers(0, 30).map(str))


@settings(max_examples=300, deadline=None)
@given(st.lists(SEGMENTS, min_size=1, max_size=9), st.sampled_from(["unet", "text_encoder"]))
def test_kohya_names_round_trip(segments, part):
    path = neutral.canonical_path(part, ".".join(segments))
    assert kohya_layout.parse_kohya_name(kohya_layout.kohya_name(part, path)) == (part, path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        formats.read(path)
    except formats.AdapterError as error:
        assert "fuzz.safetensors" in str(error)
