"""The counts of a collection, and their printing (data.py): what training uses, recounted when
images that cannot be decoded leave the splits. A student can skip this file."""
import json
import sys

import numpy as np

from vkd.reports import DataError

SPLITS = ("train", "val", "test")           # as data.SPLITS (data.py imports this file)


def count_used(collection):
    """The summary's counts of exactly what training uses: the samples in the three splits and the
    reports they come from, labels counted once per report. NaN (an ignored uncertain label) counts
    as neither 0 nor 1."""
    reports, first_sample = np.unique(collection.report_index, return_index=True)
    split_of = np.full(len(collection.reports), "", dtype=object)
    for split in SPLITS:
        split_of[collection.report_index[collection.splits[split]]] = split
    used = split_of[reports] != ""
    # (R, K), (R,)
    labels, split_of = collection.labels[first_sample[used]], split_of[reports[used]]
    positives, names = labels == 1, collection.label_names
    counts = {
        "reports_used": int(used.sum()),
        "images_used": int(sum(len(collection.splits[split]) for split in SPLITS)),
        "labels": {name: int(positives[:, k].sum()) for k, name in enumerate(names)},
        "splits": {split: int((split_of == split).sum()) for split in SPLITS},
        "labels_per_split": {split: {name: int(positives[split_of == split, k].sum())
                                     for k, name in enumerate(names)}
                             for split in SPLITS},
        "reports_without_positive_label": int((~positives.any(1)).sum()),
    }
    if np.isnan(labels).any():
        counts["ignored_uncertain"] = {name: int(np.isnan(labels[:, k]).sum())
                                       for k, name in enumerate(names)}
    return counts


def drop_undecodable(collection, undecodable, strict=False):
    """Leave the samples that cannot be decoded ({index: why}, image_cache.cached_images) out of the
    splits, counted under skipped/bad_image, with a warning; with --strict stop instead. A report
    left with no image is skipped whole (skipped/no_decodable_image) and leaves split_ids, so that
    the split files, their hash and every count of the summary describe exactly what training
    uses."""
    example = next(iter(undecodable.values()))
    if strict:
        raise DataError(f"cannot decode image {example} (--strict; without it the "
                        f"{len(undecodable)} undecodable image(s) would be skipped and counted)")
    # on stderr: stdout carries only the result (data.py --json: one JSON object)
    print(f"warning: skipped {len(undecodable)} image(s) that cannot be decoded, e.g. {example}",
          file=sys.stderr)
    bad = sorted(undecodable)

    def reports_in_splits():
        return set(
            collection.report_index[np.concatenate(list(collection.splits.values()))].tolist())
    # not the training reports that --train-fraction left out
    before = reports_in_splits()
    collection.splits = {split: np.setdiff1d(idx, bad) for split, idx in collection.splits.items()}
    lost = [collection.reports[i].id for i in sorted(before - reports_in_splits())]
    collection.split_ids = {split: [rid for rid in ids if rid not in lost]
                            for split, ids in collection.split_ids.items()}
    empty = [split for split in SPLITS if not len(collection.splits[split])]
    if empty:
        raise DataError(f"no decodable image is left in the {' and '.join(empty)} split under "
                        f"{collection.root}; {len(bad)} image(s) cannot be decoded, e.g. "
                        f"{collection.image_paths[bad[0]]}")
    summary = collection.summary
    summary["skipped"]["bad_image"] = len(bad)
    summary["skipped_ids"]["bad_image"] = [str(collection.image_paths[i]) for i in bad]
    if lost:
        summary["skipped"]["no_decodable_image"] = len(lost)
        summary["skipped_ids"]["no_decodable_image"] = lost
    # recounted: it may have been only in dropped reports
    summary.pop("ignored_uncertain", None)
    summary.update(count_used(collection))


def show_summary(collection, as_json=False):
    """What `python data.py` prints: the counts of the collection's summary as a table, or with
    `as_json` as one JSON object on stdout (and nothing else there)."""
    summary = collection.summary
    if as_json:
        print(json.dumps({k: summary[k] for k in JSON_SUMMARY_KEYS if k in summary}))
    else:
        print_summary(summary, collection.label_names)


def print_summary(summary, label_names):
    print(f"reports found {summary['reports']}, used {summary['reports_used']}, "
          f"images {summary['images_used']}")
    print("skipped: " + (", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items())
                         or "none"))
    if "sources" in summary:
        print(f"reports from {summary['sources']['reports']}, "
              f"images from {summary['sources']['images']}")
    width = max(28, *(len(name) + 2 for name in label_names))
    print(f"{'label':{width}s}" + "".join(f"{s:>7s}" for s in SPLITS) + f"{'all':>7s}")
    for name in label_names:
        counts = [summary["labels_per_split"][s][name] for s in SPLITS]
        print(f"{name:{width}s}" + "".join(f"{n:7d}" for n in counts)
              + f"{summary['labels'][name]:7d}")
    print(f"{'reports':{width}s}" + "".join(f"{summary['splits'][s]:7d}" for s in SPLITS)
          + f"{summary['reports_used']:7d}")
    print(f"reports without any positive label: {summary['reports_without_positive_label']}")
    if "labels_from" in summary:
        print(labelling_line(summary["labels_from"]))


JSON_SUMMARY_KEYS = ("reports", "reports_used", "images_used", "skipped", "labels", "splits",
                     "reports_without_positive_label", "ignored_uncertain", "sources",
                     "labels_from")


# --------------------------------------------------------------------- where the labels come from

UNCERTAIN = {"zeros": "read as negative (--uncertain zeros)",
             "ones": "read as positive (--uncertain ones)",
             "ignore": "left out of loss and metrics (--uncertain ignore)"}


def labelling(options):
    """Where a collection's labels come from, as every table of results states it (the field's
    convention): {"label_source", "uncertain", "views"}, from the data options of a run's config."""
    data, uncertain = options.get("data", "demo"), UNCERTAIN[options.get("uncertain", "zeros")]
    if data in ("demo", "openi"):
        reports = "the synthetic demo reports" if data == "demo" else "the OpenI reports"
        return {"label_source": f"MeSH majors of {reports} (vkd/openi.py)",
                "uncertain": "none (MeSH has no uncertain label)",
                "views": "frontal and lateral (every image of a report)"}
    if data == "mimic":
        table = options.get("mimic_labels", "chexpert")
        labeller = {"chexpert": "CheXpert", "negbio": "NegBio"}[table]
        views = "frontal (PA, AP)" if options.get("views", "frontal") == "frontal" else "all"
        return {"label_source": f"the {labeller} labeller (mimic-cxr-2.0.0-{table}.csv)",
                "uncertain": uncertain, "views": views}
    return {"label_source": f"the columns of {options['csv']}", "uncertain": uncertain,
            "views": "every image the CSV lists"}


def labelling_line(statement, unit=None):
    """The statement of labelling() in one line, with the bootstrap unit when given."""
    line = (f"labels: {statement['label_source']}; uncertain: {statement['uncertain']}; "
            f"views: {statement['views']}")
    return line + (f"; bootstrap unit: {unit}" if unit else "")
