"""The rare-token check at the start of training: how each tokenizer splits the trigger word,
and a warning when it is a poor trigger. DreamBooth (Ruiz et al. 2023, §4.1) binds the subject
to a rare identifier: a common word drags its own meaning into the subject, and a word split
into many pieces spreads the subject over several unrelated tokens."""
from __future__ import annotations

from ..config.sections import Config

MANY_PIECES = 3
# Frequent English words and words common in image prompts: a trigger that is one of them
# carries a strong prior meaning. Not exhaustive; the warning is advice, never an error.
COMMON_WORDS = frozenset("""
a an the of and or in on at to with for from by photo picture image portrait painting drawing
man woman person people boy girl child baby dog cat puppy kitten bird horse car house tree flower
red blue green yellow black white orange purple pink brown gray grey gold silver
big small large little old new young beautiful cute happy sad good best great
face eye eyes hair hand head body sky sun moon water sea beach forest city street room
style art artist anime cartoon realistic cinematic light dark night day
one two three toy star ball book cup shoe hat shirt dress bag box table chair
""".split())


RARE_TOKENS = ("sks", "ohwx", "zwx", "phol", "btk", "xyz")  # single, rarely used tokens in CLIP's vocabulary


def advice(tokenizer, word: str) -> str:
    """What to use instead: only rare words this very tokenizer keeps as one token, so the advice
    never names a word that has the same problem."""
    whole = [w for w in RARE_TOKENS if w != word.lower() and len(tokenizer.tokenize(w)) == 1][:2]
    if whole:
        return f"Prefer a rare word that is one token here ({', '.join(repr(w) for w in whole)}), or pivotal=true."
    return "This tokenizer has no short rare word to suggest: pivotal=true learns a new token instead."


def candidates(cfg: Config) -> list[str]:
    """The trigger: pivotal.trigger when pivotal tuning is on, else the words of the instance
    prompt that the class prompt lacks ("sks" of "a photo of sks dog" vs "a photo of dog")."""
    if cfg.pivotal.enabled:
        return [cfg.pivotal.trigger]
    class_words = set(cfg.prior.class_prompt.lower().split())
    return [w for w in cfg.data.instance_prompt.split() if w.lower().strip(",.;:()") not in class_words]


def check(tokenizers: list, cfg: Config, report=print) -> list[str]:
    """Print each candidate's pieces per tokenizer; return the warnings (also printed)."""
    warnings = []
    words = candidates(cfg)
    if not words:
        warnings.append(f"warning: every word of the instance prompt {cfg.data.instance_prompt!r} is in the class "
                        "prompt: there is no trigger word to bind the subject to. Add one, e.g. 'a photo of sks dog'.")
    for word in words:
        for tokenizer in tokenizers:
            pieces = tokenizer.tokenize(word)
            report(f"trigger      {word!r} → {len(pieces)} token{'s' * (len(pieces) != 1)} {pieces}")
            if word.lower() in COMMON_WORDS:
                warnings.append(f"warning: the trigger {word!r} is a common word: the model's meaning of it mixes "
                                f"into the subject. {advice(tokenizer, word)}")
            elif len(pieces) >= MANY_PIECES:
                warnings.append(f"warning: the trigger {word!r} splits into {len(pieces)} tokens {pieces}: the "
                                "subject is spread over several pieces with meanings of their own. "
                                + advice(tokenizer, word))
    for warning in dict.fromkeys(warnings):
        report(warning)
    return list(dict.fromkeys(warnings))
