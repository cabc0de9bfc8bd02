"""The simplest teacher: a bag-of-words linear classifier over the report tokens, as a reference for
the transformer's report encoder (`python evaluate.py --ckpt runs/openi-text-seed0/best.pt --bow`).

    v(t)_w     = [w in t] * idf_w,  v <- v / |v|          (TF-IDF, binary term counts)
    idf_w      = log((1 + N) / (1 + n_w)) + 1
    p(y_k | t) = sigmoid(a_k . v(t) + b_k)                one logistic regression per label

fitted on the training split only (its N reports, n_w of them holding token w), with positives
weighted by negatives/positives (balanced classes) and an L2 penalty, by full-batch L-BFGS. Same
tokens as the transformer, no new dependency.
"""
import numpy as np
import torch
import torch.nn.functional as F


def token_presence(tokens, vocab_size):
    """(N, T) token ids, 0 = padding -> (N, V) float 0/1: which tokens each report holds."""
    tokens = torch.as_tensor(tokens)
    presence = torch.zeros(len(tokens), vocab_size)
    presence.scatter_(1, tokens, 1.0)
    presence[:, 0] = 0                                                     # padding is not a word
    return presence


def features(presence, idf):
    v = presence * idf                                                     # (N, V)
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)


def fit_bag_of_words(tokens, labels, vocab_size, l2=1e-3, iterations=100):
    """Training tokens (N, T) and labels (N, K) in {0, 1} (NaN = not observed)
    -> predict(tokens) -> (M, K)."""
    presence = token_presence(tokens, vocab_size)
    idf = torch.log((1 + len(presence)) / (1 + presence.sum(0))) + 1      # (V,)
    v, y = features(presence, idf), torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    observed = ~torch.isnan(y)
    y = torch.where(observed, y, 0.0)
    positives = (y * observed).sum(0)
    # balanced classes
    pos_weight = ((observed.sum(0) - positives) / positives.clamp(min=1)).clamp(min=1)
    linear = torch.nn.Linear(vocab_size, y.shape[1])
    torch.nn.init.zeros_(linear.weight)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        terms = F.binary_cross_entropy_with_logits(linear(v), y, pos_weight=pos_weight,
                                                   reduction="none")
        loss = torch.where(observed, terms, 0.0).sum() / len(v) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    @torch.no_grad()
    def predict(other_tokens):
        return torch.sigmoid(
            linear(features(token_presence(other_tokens, vocab_size), idf))).numpy()
    return predict
