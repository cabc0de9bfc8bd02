"""Every option of train.py, grouped (method, the authors' choices, model, optimisation, data, speed, run management),
each with its default.

`python train.py --help` prints them; the resolved options are saved in run.json and in every checkpoint. The
model's defaults come from model.VKDConfig, the data options from data.add_data_args: each defined once, except
the report encoder's, whose defaults depend on the collection (DATA_DEFAULTS).
"""
import argparse

import data
from model import METHODS, VKDConfig

MODEL = VKDConfig()            # the model's defaults, defined once (model.py)

# The authors' design choices, all on (--preset authors): the posterior reads the report only, the classifier also
# sees the image features, KL(p || q), a cyclical beta (a ramp over the first half of every 4 epochs, as in Fu et
# al. 2019), and 100 latent samples averaged before the classifier. Their other settings (DenseNet-121, beta 1e-3,
# lr 1e-5, 224 px) are options of their own.
AUTHORS = {"posterior_input": "report", "classifier_input": "z+image", "kl_direction": "pq", "beta_cycle_epochs": 4,
           "beta_warmup_epochs": 2, "latent_samples": 100, "average_samples": True}

# Option defaults of a collection; flags given on the command line still win. Real reports (OpenI, MIMIC-CXR) are
# long (1 in 5 OpenI reports is longer than 64 tokens) and name a rare finding in one or two words among many
# normal ones: the report length comes from the training reports (max_len None), attention pooling can pick out
# the word, and positives are weighted by sqrt(negatives / positives). OpenI has only 2,600 training reports, and
# on its validation splits (split seeds 0, 1, 2; picked with a script outside the project) a transformer of one
# layer, 128 wide, with word dropout 0.2 and its sentences shuffled scored highest, and 30 epochs did better than
# 20 in one run without sentence shuffling or the settings below (see docs/RESULTS.md). Drawing the images of rare
# labels more often (--oversample) scored higher with each of three training seeds; with it, no dropout inside the
# transformer scored the same as 0.1 and takes about a third less time on a CPU (drawing dropout masks is slow
# there). On top of these, attention within each sentence only (--sentence-attention) scored higher with each of
# three training seeds. Its batches group reports of similar length (--group-by-length), each cut to its longest.
# The demo keeps the settings its numbers were measured with; MIMIC-CXR (not measured here) keeps the encoder of
# the other collections.
DATA_DEFAULTS = {
    "demo": {"max_len": 64, "text_pooling": "mean", "pos_weight": "none"},
    "openi": {"epochs": 30, "text_dim": 128, "text_layers": 1, "word_dropout": 0.2, "group_by_length": True,
              "sentence_shuffle": True, "sentence_attention": True, "oversample": True, "dropout": 0.0},
    "mimic": {},
}


def probability(text):
    """An argparse type: a float p with 0 <= p < 1 (p = 1 would replace every report word)."""
    p = float(text)
    if not 0 <= p < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1)")
    return p


def build_parser(presets, description=None):
    """The options of train.py, grouped; `presets` (train.PRESETS) are named sets of defaults (--preset NAME)."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument_group("method").add_argument
    add("--method", default="vkd", choices=[*METHODS, "all"],
        help="vkd, image (baseline), text (upper bound), or all: the three on one split, then compared (default: vkd)")
    add("--beta", type=float, default=0.1, help="weight of KL(q || p) after annealing (default: 0.1)")
    add("--beta-warmup-epochs", type=float, default=3, help="epochs over which beta rises from 0 (default: 3)")
    add("--prior-weight", type=float, default=1.0, help="lambda: weight of the BCE on prior samples (default: 1.0)")
    add("--latent-samples", type=int, default=1, help="L: reparameterised samples per image (default: 1)")
    add("--beta-cycle-epochs", type=float, default=0,
        help="restart the beta ramp every this many epochs, a cyclical schedule (the authors'); 0 = one ramp "
             "(default: 0)")
    add = parser.add_argument_group("the authors' design choices (model.py; all on: --preset authors)").add_argument
    add("--posterior-input", default="image+report", choices=["image+report", "report"],
        help="q(z | x, t) or q(z | t), the authors' (default: image+report)")
    add("--classifier-input", default="z", choices=["z", "z+image"],
        help="f(z) or f([z; h_x]), the authors' (default: z)")
    add("--kl-direction", default="qp", choices=["qp", "pq"],
        help="qp = KL(q || p) of eq. 1, pq = KL(p || q), the authors' (default: qp)")
    add("--average-samples", action="store_true",
        help="feed the mean of the L latent samples to the classifier, the authors' (with L = 100) (default: off)")
    add = parser.add_argument_group("model").add_argument
    add("--latent-dim", type=int, default=MODEL.latent_dim, help=f"size of z (default: {MODEL.latent_dim})")
    add("--backbone", default=MODEL.backbone, choices=["cnn", "resnet18", "densenet121"],
        help=f"image encoder (default: {MODEL.backbone})")
    add("--backbone-weights", default=None,
        help="imagenet (torchvision's ImageNet weights, downloaded once into torch.hub.get_dir()/checkpoints) or a "
             "local torchvision state_dict file, for --backbone resnet18/densenet121 (default: none, random init)")
    add("--cnn-width", type=int, default=MODEL.cnn_width,
        help=f"channels of the compact CNN's first stage (default: {MODEL.cnn_width})")
    add("--vocab-size", type=int, default=MODEL.vocab_size, help=f"tokenizer vocabulary (default: {MODEL.vocab_size})")
    add("--max-len", type=int, default=None, help="report tokens kept (default: the length that covers 99%% of "
                                                  "the training reports, rounded up to 16, at most 256; demo: 64)")
    add("--text-pooling", default="attention", choices=["attention", "mean"],
        help="report feature from its tokens: attention pooling or their mean (default: attention; demo: mean)")
    add("--pos-weight", default="sqrt", choices=["sqrt", "none"],
        help="weight of a positive label in the BCE: sqrt(negatives / positives) of the training split, or 1 "
             "(default: sqrt; demo: none)")
    add("--text-dim", type=int, default=MODEL.text_dim,
        help=f"transformer width (default: {MODEL.text_dim}; openi: 128)")
    add("--text-layers", type=int, default=MODEL.text_layers,
        help=f"transformer layers (default: {MODEL.text_layers}; openi: 1)")
    add("--dropout", type=float, default=MODEL.dropout,
        help=f"transformer dropout (default: {MODEL.dropout}; openi: 0)")
    add("--word-dropout", type=probability, default=MODEL.word_dropout,
        help=f"probability that a report token is replaced by [UNK] in training (default: {MODEL.word_dropout}; "
             f"openi: 0.2)")
    add("--sentence-shuffle", action=argparse.BooleanOptionalAction, default=MODEL.sentence_shuffle,
        help="in training, each report's sentences in a random order (model.shuffle_sentences) (default: off; "
             "openi: on)")
    add("--sentence-attention", action=argparse.BooleanOptionalAction, default=MODEL.sentence_attention,
        help="a report token attends only to the tokens of its own sentence (model.sentence_mask) (default: off; "
             "openi: on)")
    add = parser.add_argument_group("optimisation").add_argument
    add("--epochs", type=int, default=None, help="training epochs (default: 12; openi: 30; or the resumed run's)")
    add("--batch-size", type=int, default=64, help="images per step, over all processes (default: 64)")
    add("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    add("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    add("--warmup-steps", type=int, default=30, help="linear learning-rate warm-up steps (default: 30)")
    add("--clip-grad", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    add("--no-augment", action="store_true", help="turn off random affine augmentation (default: on)")
    add("--oversample", action=argparse.BooleanOptionalAction, default=False,
        help="draw the training images of rare labels more often, with replacement (batching.draw_weights); an "
             "epoch keeps its length (default: off; openi: on)")
    add("--seed", type=int, default=0, help="seed of initialisation, shuffling and sampling (default: 0)")
    data.add_data_args(parser.add_argument_group("data"))
    add = parser.add_argument_group("speed").add_argument
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="autocast: auto = bf16 on CUDA, off on CPU (default: auto)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--preload", default="auto", choices=["auto", "yes", "no"],
        help="copy the whole uint8 image cache to the device once; no = stream batches from the memory-mapped "
             "file; auto = yes when it takes at most half the free device memory (default: auto)")
    add("--log-every", type=int, default=50,
        help="show the running loss on the progress bar every N steps, one host sync each; 0 = never (default: 50)")
    add("--channels-last", action="store_true", help="channels_last memory format, faster convs on GPUs (default: off)")
    add("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
        help="batch reports of similar length and cut each batch's padding (batching.group_by_length): the report "
             "encoder skips the padding beyond each batch's longest report; batches are then not independent draws; "
             "never with --method image, which reads no report (default: off; openi: on)")
    add = parser.add_argument_group("run management").add_argument
    add("--preset", default=None, choices=sorted(presets),
        help=f"option defaults of a preset: {presets} (default: none)")
    add("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: one run per seed (and method), then the "
                                      "comparison with mean +- std across seeds (default: --seed alone)")
    add("--out", default=None, help="run folder (default: runs/<data>[-<preset>]-<method>-seed<seed>); with --method "
                                    "all or --seeds, the folder that holds those run folders (default: runs)")
    add("--resume", action="store_true", help="continue from <out>/last.pt with its saved config (default: off)")
    add("--stop-after", type=int, default=None,
        help="leave after this many epochs of this invocation, e.g. for time-limited jobs; continue with --resume "
             "(default: run to --epochs)")
    add("--allow-missing-labels", action="store_true",
        help="train even when a label has no positive training image (its AUROC is then meaningless) (default: stop)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples for test intervals (default: 1000)")
    return parser


def get_args(argv=None, presets=None, description=None):
    """Parse the command line; a --preset's values become the defaults, so that explicit flags still win."""
    presets = presets or {}
    parser = build_parser(presets, description)
    args = parser.parse_args(argv)
    # the collection's defaults, then the preset's, become the defaults; then parse again (given flags win)
    if not args.resume:                      # a resumed run keeps its saved options
        parser.set_defaults(**DATA_DEFAULTS.get(args.data, {}) | presets.get(args.preset, {}))
    args = parser.parse_args(argv)
    if args.method != "all" and args.seeds is None:
        args.out = args.out or f"runs/{run_name(args, args.method, args.seed)}"
    return for_method(args)


def for_method(args, **changes):
    """args with `changes`. `--method image` reads no report: the report options that would change nothing but its
    batches are turned off for it, so that its saved config says what ran."""
    args = argparse.Namespace(**vars(args) | changes)
    if args.method == "image":
        args.group_by_length = args.sentence_shuffle = args.sentence_attention = False
    return args


def collection_name(args):
    """<data>[-<preset>], e.g. demo-tiny: what run folders and comparisons are named after."""
    preset = getattr(args, "preset", None)                   # configs saved before presets existed have none
    return f"{args.data}-{preset}" if preset else args.data


def run_name(args, method, seed):
    """The folder name of one run, e.g. demo-tiny-vkd-seed0."""
    return f"{collection_name(args)}-{method}-seed{seed}"


def model_config(args, num_labels, vocab_size, sentence_end=-1):
    """The model's configuration from the options; a run saved before an option existed gets its old value.
    sentence_end: the tokenizer's id of "." (None: not in its vocabulary)."""
    for flag in ("sentence_shuffle", "sentence_attention"):
        if getattr(args, flag, False) and sentence_end in (None, -1):
            option = flag.replace("_", "-")
            raise data.DataError(f'--{option}: the tokenizer has no "." to end a sentence; use --no-{option}')
    return VKDConfig(num_labels=num_labels, latent_dim=args.latent_dim, backbone=args.backbone,
                     cnn_width=args.cnn_width, vocab_size=vocab_size, max_len=args.max_len, text_dim=args.text_dim,
                     text_layers=args.text_layers, text_pooling=getattr(args, "text_pooling", "mean"),
                     dropout=args.dropout, word_dropout=getattr(args, "word_dropout", 0.0), method=args.method,
                     sentence_shuffle=getattr(args, "sentence_shuffle", False),
                     sentence_attention=getattr(args, "sentence_attention", False),
                     sentence_end=-1 if sentence_end is None else sentence_end,
                     posterior_reads_image=getattr(args, "posterior_input", "image+report") == "image+report",
                     classifier_reads_image=getattr(args, "classifier_input", "z") == "z+image",
                     kl_direction=getattr(args, "kl_direction", "qp"),
                     average_samples=getattr(args, "average_samples", False))
