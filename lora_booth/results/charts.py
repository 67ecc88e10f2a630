"""The report's charts: loss curves and the validation loss, drawn with matplotlib's Agg backend."""
from __future__ import annotations

import io
import statistics


CURVES = (("loss", "total loss"), ("instance_loss", "instance loss"), ("prior_loss", "prior loss (λ-free)"),
          ("lr", "learning rate"))


def curves_png(records: list[dict], size: tuple[float, float] = (10, 6)) -> bytes:
    """Total, instance and prior loss and the learning rate over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=90, layout="constrained")
    steps = [r["step"] for r in records]
    for index, (key, title) in enumerate(CURVES):
        axes = figure.add_subplot(2, 2, index + 1)
        values = [r.get(key, float("nan")) for r in records]
        axes.plot(steps, values, color="C0" if key != "lr" else "C1", linewidth=1)
        if key != "lr" and len(values) >= 10:  # per-step losses are noisy: a moving average shows the trend
            window = max(2, len(values) // 20)
            smooth = [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
            axes.plot(steps, smooth, color="C3", linewidth=1.5, label=f"mean of {window}")
            axes.legend(loc="upper right", fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


VALIDATION = (("val_instance_loss", "instance rows", "C0"), ("val_prior_loss", "class rows (λ-free)", "C2"))


def validation_points(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that hold a validation loss (validate.every)."""
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def lowest(points: list[tuple[int, float]]) -> tuple[int, float]:
    """The (step, value) of the smallest value, the earliest step on a tie."""
    return min(points, key=lambda point: (point[1], point[0]))


def validation_png(records: list[dict]) -> bytes | None:
    """The validation losses over steps, each curve's minimum marked; None when none was logged."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    curves = [(validation_points(records, key), label, color) for key, label, color in VALIDATION]
    curves = [curve for curve in curves if curve[0]]
    if not curves:
        return None
    figure = Figure(figsize=(10, 3.5), dpi=90, layout="constrained")
    for index, (points, label, color) in enumerate(curves):
        axes = figure.add_subplot(1, len(curves), index + 1)
        axes.plot([s for s, _ in points], [v for _, v in points], color=color, linewidth=1, marker=".")
        step, value = lowest(points)
        axes.plot([step], [value], "o", markersize=9, markerfacecolor="none", color="C3",
                  label=f"minimum {value:.4f} at step {step}")
        axes.legend(loc="upper right", fontsize=8)
        axes.set_title(f"validation loss: {label}", fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
