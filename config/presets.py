"""Named presets: `python train.py --preset NAME` makes a preset's values the option defaults; flags
given on the command line still win. Each is a plain dict of train.py options (dashes as
underscores); train.get_args applies it after the collection's defaults (collections.py)."""

PRESETS = {
    # The whole pipeline in under a minute on a CPU: a smaller demo, smaller images, fewer epochs.
    "tiny": {"demo_reports": 600, "image_size": 64, "epochs": 8, "batch_size": 32},

    # The authors' design choices, all on: the posterior reads the report only, the classifier also
    # sees the image features, KL(p || q), a cyclical beta (a ramp over the first half of every 4
    # epochs, as in Fu et al. 2019), and 100 latent samples averaged before the classifier. Their
    # other settings (DenseNet-121, beta 1e-3, lr 1e-5, 224 px) are options of their own.
    "authors": {"posterior_input": "report", "classifier_input": "z+image", "kl_direction": "pq",
                "beta_cycle_epochs": 4, "beta_warmup_epochs": 2, "latent_samples": 100,
                "average_samples": True},
}
