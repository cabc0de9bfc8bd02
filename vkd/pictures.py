"""Pictures: ROC and precision-recall curves, the reliability diagram, training curves and the
latent space.

evaluate.py draws them with --plots (and --compare --plots for the curves of several methods).
matplotlib is an optional extra, imported only when a picture is drawn (pyplot); without it
PlotError says how to get it.
"""
import json
from pathlib import Path

import numpy as np

from vkd.calibration import apply_temperature, calibration_bins, expected_calibration_error
from vkd.metrics import auroc, average_precision, observed, threshold_counts
from vkd.reports import save_atomically

class PlotError(Exception):
    """A picture was asked for but cannot be drawn (matplotlib missing)."""


def pyplot():
    """matplotlib is an optional extra (pip install matplotlib): imported only when a picture is
    drawn."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("pictures need matplotlib, an optional extra: "
                        "pip install matplotlib") from None
    matplotlib.use("Agg")                                            # files only, no display
    import matplotlib.pyplot as plt
    return plt


def label_grid(plt, num_labels, title):
    columns = 4
    rows = -(-num_labels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.5 * rows), squeeze=False)
    figure.suptitle(title, fontsize=10)
    for ax in axes.ravel()[num_labels:]:
        ax.axis("off")
    return figure, axes.ravel()


def plot_curves(y, named_predictions, label_names, out):
    """ROC and precision-recall curves per label, one panel per label, one line per run
    -> roc.png, pr.png."""
    plt = pyplot()
    paths = []
    for kind, metric in (("roc", auroc), ("pr", average_precision)):
        figure, axes = label_grid(plt, len(label_names), "ROC curves (test)" if kind == "roc" else
                                  "precision-recall curves (test); dotted: prevalence")
        for k, (ax, label) in enumerate(zip(axes, label_names)):
            for name, p in named_predictions:
                y_k, p_k = observed(y[:, k], p[:, k])
                if y_k.all() or not y_k.any():
                    continue
                _, tp, fp = threshold_counts(y_k, p_k)
                if kind == "roc":
                    ax.plot(np.r_[0, fp / (~y_k).sum()], np.r_[0, tp / y_k.sum()], lw=1,
                            label=f"{name} {metric(y_k, p_k):.2f}")
                else:
                    # AP's rectangles: precision P_n held over recall (R_{n-1}, R_n]
                    ax.step(np.r_[0, tp / y_k.sum()], np.r_[1, tp / (tp + fp)], where="pre", lw=1,
                            label=f"{name} {metric(y_k, p_k):.2f}")
            y_k, _ = observed(y[:, k], y[:, k])
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="gray", lw=0.5, ls=":")
            elif len(y_k):
                ax.axhline(y_k.mean(), color="gray", lw=0.5, ls=":")
            ax.set(xlim=(0, 1), ylim=(0, 1.02))
            ax.set_title(f"{label} ({int(y_k.sum())})", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left",
                      frameon=False)
        figure.tight_layout()
        path = Path(out) / f"{kind}.png"
        save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=72, format="png"))
        plt.close(figure)
        paths.append(path)
    return paths


def plot_reliability(y, p, out, num_bins=15, temperature=None):
    """Reliability diagram over all observed (sample, label) pairs: fraction positive against mean
    predicted probability per bin (the diagonal is perfect calibration), and how many predictions
    fall in each bin."""
    plt = pyplot()
    figure, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    curves = [("as predicted", p)] + ([(f"temperature {temperature:.2f}",
                                        apply_temperature(p, temperature))]
                                      if temperature is not None else [])
    for name, q in curves:
        count, confidence, frequency = calibration_bins(y, q, num_bins)
        filled = count > 0
        ax.plot(confidence[filled], frequency[filled], marker="o", ms=3,
                label=f"{name}: ECE {expected_calibration_error(y, q, num_bins):.3f}")
        ax_count.bar((np.arange(num_bins) + 0.5) / num_bins, count, width=1 / num_bins, alpha=0.5)
    ax.set(ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1),
           title="reliability diagram (test, all labels)")
    ax.legend(fontsize=8, loc="upper left")
    ax_count.set(xlabel="predicted probability", ylabel="predictions", yscale="log")
    figure.tight_layout()
    path = Path(out) / "reliability.png"
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=72, format="png"))
    plt.close(figure)
    return path


def plot_training(log_path, out):
    """Training curves from a run's log.jsonl: loss parts, KL, beta and validation macro AUROC per
    epoch."""
    plt = pyplot()
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    figure, axes = plt.subplots(1, 4, figsize=(13, 3))
    # the loss parts a method logs (model.LOSS_PARTS): distill and contrastive have no KL
    parts = [key for key in ("loss", "bce_posterior", "bce_prior", "distill", "contrastive")
             if key in records[0]]
    for key in parts:
        axes[0].plot(epochs, [r[key] for r in records], marker=".", label=key)
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], "kl", "KL(q || p), nats"),
                           (axes[2], "beta", "beta (end of epoch)"),
                           (axes[3], "val_macro_auroc", "validation macro AUROC")):
        if key in records[0]:
            ax.plot(epochs, [r[key] for r in records], marker=".")
        ax.set_title(title, fontsize=9)
    axes[0].set_title("training loss parts", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
    figure.tight_layout()
    path = Path(out) / "training.png"
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=72, format="png"))
    plt.close(figure)
    return path


def pca_2d(arrays):
    """Project arrays (N_i, D) onto the first two principal components of all of them together, so
    that they share one pair of axes. SVD of the centred data, in numpy."""
    stacked = np.concatenate(arrays)
    mean = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    return [(a - mean) @ vt[:2].T for a in arrays]


def plot_latents(named_means, y_label, label_name, out):
    """2-D view (shared PCA) of the latent means, prior mu_p(x) next to posterior mu_q(x, t),
    coloured by one label: how far the image-only prior has come towards the report-informed
    posterior."""
    plt = pyplot()
    projected = pca_2d([means for _, means in named_means])
    figure, axes = plt.subplots(1, len(named_means), figsize=(4.2 * len(named_means), 4),
                                squeeze=False, sharex=True, sharey=True)
    colours = np.where(np.isnan(y_label), "lightgray",
                       np.where(y_label == 1, "tab:red", "tab:blue"))
    for ax, (name, _), xy in zip(axes[0], named_means, projected):
        # positives drawn last, on top
        for value, colour in ((0, "tab:blue"), (1, "tab:red")):
            keep = colours == colour
            ax.scatter(xy[keep, 0], xy[keep, 1], s=6, c=colour, alpha=0.7,
                       label=f"{label_name} {'present' if value else 'absent'}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("PC 1")
    axes[0, 0].set_ylabel("PC 2")
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(out) / "latents.png"
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=72, format="png"))
    plt.close(figure)
    return path
