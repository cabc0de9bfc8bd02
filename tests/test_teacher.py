"""The report-reading path: the length limit from the data, the collection's defaults, attention
pooling, the positive-label weights, what reaches the tokenizer, and the bag-of-words reference."""
import json
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import train
from config.collections import COLLECTIONS
from model import VKD, TextEncoder, VKDConfig, bce
from vkd import batching, options
from vkd.batching import positive_weights
from vkd.bow import fit_bag_of_words, token_presence
from vkd.metrics import auroc_summary

SMALL = dict(latent_dim=8, cnn_width=4, vocab_size=50, max_len=12, text_dim=16, text_heads=2,
             text_layers=1)


class FixedLengths:
    """A tokenizer stand-in whose i-th text has a known number of tokens."""

    def __init__(self, lengths):
        self.lengths = lengths

    def encode_batch(self, texts):
        return [SimpleNamespace(ids=[5] * self.lengths[int(text)]) for text in texts]


# ------------------------------------------------------------------------------------- length limit

@pytest.mark.parametrize("lengths, expected", [
    (list(range(1, 101)), 112),         # 99th percentile 99.01 -> rounded up to a multiple of 16
    ([10] * 199 + [1000], 16),          # one very long report in 200 does not set the limit
    ([40] * 50 + [64] * 50, 64),        # already a multiple of 16: kept
    ([300] * 10, 256),                  # the cap
])
def test_length_limit_covers_99_percent_rounded_up_and_capped(lengths, expected):
    texts = [str(i) for i in range(len(lengths))]
    assert data.length_limit(FixedLengths(lengths), texts) == expected


def test_max_len_comes_from_the_collection_unless_given():
    assert train.get_args(["--data", "openi"]).max_len is None      # from the training reports
    assert train.get_args(["--data", "mimic"]).max_len is None
    assert train.get_args(["--data", "openi", "--max-len", "40"]).max_len == 40
    assert train.get_args([]).max_len == 64                         # the demo keeps its measured 64
    assert train.get_args(["--max-len", "32"]).max_len == 32


def test_collection_defaults_lose_to_given_flags_and_presets():
    openi = train.get_args(["--data", "openi"])
    assert (openi.text_pooling, openi.pos_weight) == ("attention", "sqrt")
    demo = train.get_args([])
    assert (demo.text_pooling, demo.pos_weight) == ("mean", "none")
    given = train.get_args(["--data", "openi", "--text-pooling", "mean", "--pos-weight", "none"])
    assert (given.text_pooling, given.pos_weight) == ("mean", "none")
    assert (train.get_args(["--preset", "tiny"]).epochs == 8
            and train.get_args(["--preset", "tiny"]).max_len == 64)
    assert set(COLLECTIONS) == {"demo", "openi", "mimic", "csv"}
    assert (openi.epochs, demo.epochs,
            train.get_args(["--data", "openi", "--epochs", "5"]).epochs) == (30, 12, 5)
    assert ((openi.text_dim, openi.text_layers, openi.word_dropout, openi.group_by_length)
            == (128, 1, 0.2, True))
    assert ((demo.text_dim, demo.text_layers, demo.word_dropout, demo.group_by_length)
            == (64, 2, 0.0, False))
    assert not train.get_args(["--data", "openi", "--no-group-by-length"]).group_by_length
    assert openi.sentence_shuffle and not demo.sentence_shuffle
    assert (openi.dropout, demo.dropout) == (0.0, 0.1)
    assert (openi.oversample and not demo.oversample
            and not train.get_args(["--data", "mimic"]).oversample)
    assert not train.get_args(["--data", "openi", "--no-oversample"]).oversample
    assert not train.get_args(["--data", "openi", "--no-sentence-shuffle"]).sentence_shuffle
    assert openi.sentence_attention and not demo.sentence_attention
    dot = data.train_tokenizer(["no acute disease. normal heart."], 60).token_to_id(".")
    shuffled = options.model_config(openi, 14, 60, dot)
    assert (dot > 1 and shuffled.sentence_shuffle and shuffled.sentence_attention
            and shuffled.sentence_end == dot)
    with pytest.raises(data.DataError, match="no-sentence-shuffle"):
        options.model_config(openi, 14, 60, None)                 # a vocabulary without "."
    whole = train.get_args(["--data", "openi", "--no-sentence-shuffle", "--no-sentence-attention"])
    assert (not whole.sentence_attention
            and not options.model_config(whole, 14, 60, None).sentence_attention)
    with pytest.raises(data.DataError, match="no-sentence-attention"):
        options.model_config(train.get_args(["--data", "openi", "--no-sentence-shuffle"]),
                             14, 60, None)
    assert options.model_config(openi, 14, 2000, dot).word_dropout == 0.2  # reaches the model
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit):                                    # argparse names the flag
            train.get_args(["--word-dropout", bad])
    # a resumed run keeps its saved options: no collection default may replace them
    assert train.get_args(["--data", "openi", "--resume", "--out", "runs/x"]).epochs is None


def test_a_saved_config_gives_back_the_same_model_config():
    """resume and evaluate rebuild the model from the config saved in run.json and checkpoints."""
    for argv in ([], ["--data", "openi"], ["--preset", "authors"], ["--method", "text"]):
        args = train.get_args(argv + ["--max-len", "32"])
        saved = Namespace(**json.loads(json.dumps(vars(args))))       # as run.json holds it
        assert options.model_config(saved, 14, 50, 7) == options.model_config(args, 14, 50, 7)


# ------------------------------------------------------------------------- what the tokenizer reads

def test_only_training_reports_reach_the_tokenizer_and_the_length_limit(tmp_path, monkeypatch):
    seen = {}
    real_train, real_limit = data.train_tokenizer, data.length_limit

    def spy_train(texts, vocab_size):
        seen["tokenizer"] = list(texts)
        return real_train(texts, vocab_size)

    def spy_limit(tokenizer, texts):
        seen["limit"] = list(texts)
        return real_limit(tokenizer, texts)

    monkeypatch.setattr(data, "train_tokenizer", spy_train)
    monkeypatch.setattr(data, "length_limit", spy_limit)
    args = train.get_args(["--demo-reports", "60", "--image-size", "16",
                           "--data-dir", str(tmp_path / "data")])
    args.max_len = None                                 # as for --data openi: derived from the data
    (tmp_path / "run").mkdir()
    collection, _, _, _ = data.load_for_run(args, tmp_path / "run", None)
    reports_of = {split: {collection.report_index[i] for i in collection.splits[split]}
                  for split in data.SPLITS}
    train_texts = sorted(collection.reports[i].text for i in reports_of["train"])
    held_out = {collection.reports[i].text for i in reports_of["val"] | reports_of["test"]}
    assert sorted(seen["tokenizer"]) == train_texts and sorted(seen["limit"]) == train_texts
    assert not held_out & set(seen["tokenizer"])
    assert args.max_len == real_limit(data.load_tokenizer(tmp_path / "run" / "tokenizer.json"),
                                      train_texts)


# -------------------------------------------------------------------------------------- the encoder

def reports(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 50, (B, 12), generator=g)
    lengths = torch.tensor([8, 3, 12, 1, 5, 8])[:B]
    t[torch.arange(12)[None] >= lengths[:, None]] = 0                    # padding after each report
    return t, lengths


@pytest.mark.parametrize("pooling, sentences",
                         [("attention", False), ("mean", False), ("attention", True)])
def test_padding_never_changes_the_report_feature(pooling, sentences):
    torch.manual_seed(0)
    config = VKDConfig(**SMALL | {"text_pooling": pooling, "sentence_attention": sentences,
                                  "sentence_end": 9})
    encoder = TextEncoder(config).eval()
    t, lengths = reports()
    t[0, 3] = t[2, 5] = 9                                               # "." inside two reports
    h = encoder(t)                                                      # (B, C)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(encoder(t[i:i + 1, :n])[0], h[i])    # the report alone, unpadded
    other = t.clone()
    other[1:] = torch.randint(1, 50, other[1:].shape)                   # other reports of the batch
    torch.testing.assert_close(encoder(other)[0], h[0])
    changed = t.clone()
    changed[0, 0] = (t[0, 0] % 49) + 1                                        # a real token changes
    assert not torch.allclose(encoder(changed)[0], h[0])


def test_word_dropout_replaces_words_by_unk_in_training_only():
    from vkd.text_tuning import PAD, UNK
    tokenizer = data.train_tokenizer(["no acute disease", "small left effusion"], 60)
    assert (tokenizer.token_to_id("[PAD]"), tokenizer.token_to_id("[UNK]")) == (PAD, UNK)
    torch.manual_seed(0)
    encoder = TextEncoder(VKDConfig(**SMALL, word_dropout=0.5))
    seen = []
    encoder.token_embedding.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0]))
    t, _ = reports()
    t[0, 0] = UNK
    encoder.train()(t)
    dropped = seen[-1] != t
    # words only, never padding
    assert (seen[-1][dropped] == UNK).all() and (t[dropped] > UNK).all()
    assert 0.3 < dropped.sum() / (t > UNK).sum() < 0.7
    encoder.eval()(t)
    assert torch.equal(seen[-1], t)                                    # evaluation reads every word


def test_image_runs_neither_group_nor_shuffle_reports_and_say_so():
    tokens = torch.tensor([[5, 6, 0], [7, 0, 0]])
    openi = train.get_args(["--data", "openi"])
    assert batching.report_lengths(tokens, openi).tolist() == [2, 1]
    image = train.get_args(["--data", "openi", "--method", "image"])
    assert batching.report_lengths(tokens, image) is None           # --method image reads no report
    # and its saved config says so
    assert not image.group_by_length and not image.sentence_shuffle
    each = options.for_method(train.get_args(["--data", "openi", "--method", "all"]),
                              method="image")
    assert not each.group_by_length and not each.sentence_shuffle   # --method all's image runs too
    assert not image.sentence_attention and not each.sentence_attention
    assert options.for_method(openi, method="vkd").group_by_length
    assert batching.report_lengths(tokens, train.get_args([])) is None     # the demo does not group


def test_sentence_shuffle_reorders_whole_sentences_in_training_only():
    from vkd.text_tuning import shuffle_sentences
    dot = 9
    t = torch.tensor([
        [2, 3, dot, 4, dot, 5, 6, 7, 0, 0],        # three sentences, the last without "."
        [8, dot, 0, 0, 0, 0, 0, 0, 0, 0],          # one sentence
        [8, 7, 6, 5, 4, 0, 0, 0, 0, 0],            # no "."
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],            # nothing but padding
        [2, dot, 3, dot, 4, dot, 5, dot, 6, 7]])   # cut at max_len: no padding
    kept = t[1:4].tolist()
    sentences = [[2, 3, dot], [4, dot], [5, 6, 7]]
    cut = [[2, dot], [3, dot], [4, dot], [5, dot], [6, 7]]

    def order_of(row, sentences):                     # the row as whole sentences, or StopIteration
        order = []
        while row:
            first = next(s for s in sentences if row[:len(s)] == s)
            order.append(sentences.index(first))
            row = row[len(first):]
        return tuple(order)

    torch.manual_seed(0)
    orders = set()
    for _ in range(200):
        out = shuffle_sentences(t, dot)
        # padding stays at the end
        assert out[1:4].tolist() == kept and out[0, 8:].tolist() == [0, 0]
        orders.add(order_of(out[0, :8].tolist(), sentences))     # three whole sentences
        assert sorted(order_of(out[4].tolist(), cut)) == [0, 1, 2, 3, 4]
    # every order of three sentences occurs
    assert len(orders) == 6
    config = VKDConfig(**SMALL, sentence_shuffle=True, sentence_end=dot)
    torch.manual_seed(0)
    encoder = TextEncoder(config)
    seen = []
    encoder.token_embedding.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0]))
    torch.manual_seed(1)
    encoder.train()(t)
    # training shuffles (this seed does move them)
    assert not torch.equal(seen[-1], t)
    encoder.eval()(t)
    # evaluation reads the report as written
    assert torch.equal(seen[-1], t)
    with pytest.raises(AssertionError, match="sentence_end"):
        TextEncoder(VKDConfig(**SMALL, sentence_shuffle=True))   # no id of "." given


def test_sentence_attention_keeps_each_sentence_to_itself():
    """With sentence_attention, the features of a sentence's tokens do not depend on any other
    sentence; without it they do. Word dropout never drops the "." that ends a sentence there."""
    from vkd.text_tuning import UNK, sentence_mask
    dot = 9
    t = torch.tensor([[2, 3, dot, 4, 5, dot, 6, 0],            # "2 3 ." "4 5 ." "6", then padding
                      [7, 8, 6, 5, 4, 3, 2, 0]])               # one sentence without "."
    allowed = ~sentence_mask(t, dot)
    # the first sentence sees itself only
    assert allowed[0, :3, :3].all() and not allowed[0, :3, 3:].any()
    # "6" sees itself, never the padding
    assert allowed[0, 6].tolist() == [False] * 6 + [True, False]
    assert allowed[:, 7, 7].all()                             # padding sees itself: no row is empty
    # one sentence: every word, no padding
    assert allowed[1, :7, :7].all() and not allowed[1, :7, 7].any()
    changed = t.clone()
    changed[0, 3] = 8                                         # a word of the second sentence
    for sentences, first_sentence_moves in ((True, False), (False, True)):
        torch.manual_seed(0)
        config = VKDConfig(**SMALL | {"sentence_attention": sentences, "sentence_end": dot,
                                      "text_layers": 2})
        encoder = TextEncoder(config).eval()
        features = []
        encoder.norm.register_forward_hook(lambda module, inputs, output: features.append(output))
        encoder(t), encoder(changed)
        with torch.no_grad():                    # inference may take PyTorch's fused attention path
            encoder(t), encoder(changed)
        for before, after in (features[0:2], features[2:4]):
            assert torch.allclose(before[0, :3], after[0, :3], atol=1e-6) != first_sentence_moves
            # the changed sentence does move
            assert not torch.allclose(before[0, 3:6], after[0, 3:6])
        torch.testing.assert_close(features[2], features[0])                     # both paths agree
    encoder = TextEncoder(VKDConfig(**SMALL, word_dropout=0.9, sentence_attention=True,
                                    sentence_end=dot)).train()
    seen = []
    encoder.token_embedding.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0]))
    encoder(t.repeat(50, 1))
    assert (seen[-1][t.repeat(50, 1) == dot] == dot).all() and (seen[-1] == UNK).sum() > 300


def test_attention_pooling_can_attend_to_one_token():
    """A query that scores one token id far above the rest returns that token's feature: a
    one-word finding is not averaged away as it is by the mean."""
    torch.manual_seed(0)
    encoder = TextEncoder(VKDConfig(**SMALL | {"text_pooling": "attention",
                                               "text_layers": 1})).eval()
    h = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    pool = encoder.pool
    with torch.no_grad():
        pool.score.weight.zero_()
        pool.score.bias.zero_()
        h[:, 2, 0] = 100.0                                             # token 2 stands out on dim 0
        pool.score.weight[:, 0] = 1.0
    pooled = torch.einsum("bth,btc->bhc",
                          pool.score(h).masked_fill(padding[..., None], -1e9).softmax(1), h)
    torch.testing.assert_close(pooled[:, 0], h[:, 2])
    h[1, 3:] = 1e6                                                            # padding: weight zero
    torch.testing.assert_close(pool(h, padding)[1:], pool(h[:, :3], padding[:, :3])[1:])


def test_positive_weights_and_weighted_bce():
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0]])
    torch.testing.assert_close(positive_weights(y, "sqrt"), torch.tensor([2.0, 2.0, 3 ** 0.5]))
    torch.testing.assert_close(positive_weights(y, "none"), torch.ones(3))
    logits = torch.randn(5, 3)
    w = positive_weights(y, "sqrt")
    observed = ~torch.isnan(y)
    expected = -(w * y.nan_to_num() * F.logsigmoid(logits)
                 + (1 - y.nan_to_num()) * F.logsigmoid(-logits))
    torch.testing.assert_close(bce(logits, y, w), (expected * observed).sum(-1).mean())
    assert not torch.allclose(bce(logits, y, w), bce(logits, y))


def test_model_uses_its_positive_weights_and_does_not_save_them():
    torch.manual_seed(0)
    cfg = VKDConfig(method="image", **SMALL)
    x, y = torch.randn(4, 1, 32, 32), (torch.rand(4, 14) < 0.5).float()
    plain, weighted = VKD(cfg).eval(), VKD(cfg, pos_weight=torch.full((14,), 3.0)).eval()
    weighted.load_state_dict(plain.state_dict())                          # no pos_weight key needed
    assert "pos_weight" not in plain.state_dict()
    assert weighted(x, None, y)["loss"] > plain(x, None, y)["loss"]


# ------------------------------------------------------------------------------------- bag of words

def toy_reports(n, seed):
    """Label k is positive exactly when token 10 + k is in the report, among random filler tokens
    20..49."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) < 0.3).astype(np.float32)
    tokens = np.zeros((n, 10), dtype=np.int64)
    for i in range(n):
        words = list(rng.integers(20, 50, 4)) + [10 + k for k in range(3) if labels[i, k]]
        tokens[i, :len(words)] = rng.permutation(words)
    return tokens, labels


def test_token_presence_ignores_padding_and_repeats():
    presence = token_presence(torch.tensor([[3, 3, 1, 0, 0]]), 5)
    torch.testing.assert_close(presence, torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]))


def test_bag_of_words_learns_a_separable_toy_problem():
    tokens, labels = toy_reports(200, 0)
    test_tokens, test_labels = toy_reports(100, 1)
    predict = fit_bag_of_words(tokens, labels, 50)
    assert auroc_summary(test_labels, predict(test_tokens))["macro"] == 1.0
    shuffled = fit_bag_of_words(tokens, labels[np.random.default_rng(2).permutation(200)], 50)
    # nothing to learn: chance
    assert auroc_summary(test_labels, shuffled(test_tokens))["macro"] < 0.8


def test_a_run_stores_the_derived_length_and_evaluate_fits_the_bag_of_words(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_train import TINY
    cut = TINY.index("--max-len")
    argv = TINY[:cut] + TINY[cut + 2:] + [
        "--method", "text", "--text-pooling", "attention", "--pos-weight", "sqrt", "--oversample",
        "--epochs", "1", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    args = train.get_args(argv)
    args.max_len = None                                          # derived, as for --data openi
    drawn, epoch_order = [], batching.epoch_order

    def recording_epoch_order(*positional, **named):      # records the draw weights train.py passes
        drawn.append(positional[7] if len(positional) > 7 else named.get("weights"))
        return epoch_order(*positional, **named)
    monkeypatch.setattr(batching, "epoch_order", recording_epoch_order)
    train.train(args)
    # one epoch, oversampled
    assert len(drawn) == 1 and drawn[0] is not None and (drawn[0] >= 1).all()
    run = tmp_path / "run"
    tokenizer = data.load_tokenizer(run / "tokenizer.json")
    collection = data.prepare_from(json.loads((run / "run.json").read_text())["config"])
    texts = [collection.reports[i].text
             for i in np.unique(collection.report_index[collection.splits["train"]])]
    derived = data.length_limit(tokenizer, texts)
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["max_len"] == derived and config["oversample"]
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["model_config"]["max_len"] == derived
    assert checkpoint["model_config"]["text_pooling"] == "attention"
    result = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(run / "best.pt"),
                             "--json", "--bow", "--bootstrap", "20"],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                            text=True, check=True)
    assert 0.5 < json.loads(result.stdout)["bag_of_words"]["macro_auroc"] <= 1
