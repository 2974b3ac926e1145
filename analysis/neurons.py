"""Every MLP neuron scored on the neuron types of Ferrando et al. 2024 (arXiv 2405.00208, section 5.2).

A neuron j of layer l is one input coordinate of the MLP's output projection (GELU(fc) for GPT-2, act(gate) * up
for gated Llama MLPs); w_j = W_out[:, j] is what one unit of it adds to the residual. Its direct logit effect is
v_j = W_U (gain ⊙ w_j) over the tokenizer's tokens (w_j centred first under LayerNorm: analysis.logits.Unembed;
cosines and variances come from the vocab-centred Gram matrix of W_U, the same numbers without the [vocab] vector).
Each score is in [0, 1]; a neuron is tagged with a type when its score reaches the threshold in brackets:

    position        [0.4] min(eta²_random, eta²_text): the share of the activation's variance that its position
                    explains, in `bins` log-spaced position bins after the prefix and the first `skip` tokens, on
                    random tokens and on real text, so a token-driven neuron fails one of them (Voita et al. 2023;
                    Gurnee et al. 2024). Evidence: the peak position (first position of the bin of highest mean
                    activation on random tokens), both eta².
    token_frequency [0.5] (|cos| − chance) / (1 − chance), clamped to [0, 1]: cos = cos(v_j − mean, log c − mean),
                    c the unigram counts of offline text, a token never seen counted `count_floor` (Stolfo et al.
                    2024); chance = the `chance_quantile` of |cos| over random residual directions through the same
                    W_U (settings["frequency_chance"]). Evidence: the signed cosine (> 0: raising the neuron moves
                    the logits toward the unigram distribution).
    entropy         [0.5] min(null_fraction, norm_factor): null_fraction = ||P w||² / ||w||², w = gain ⊙ w_j
                    (centred under LayerNorm), P the projection on the bottom round(null_share · d) right singular
                    directions of the vocab-centred W_U; norm_factor = clamp(n_j / (norm_scale · median of its
                    layer's n), 0, 1), n_j = std_j · ||w_j|| its output norm (std_j: the activation's std on text)
                    (Stolfo et al. 2024; Gurnee et al. 2024). Evidence: null_fraction, norm_ratio (n_j / median,
                    unclamped) and, for the model's `effect_neurons` highest scores,
                    entropy_effect: the mean change of next-token entropy (nats) on a text sequence when the
                    activation rises by effect_stds × its std on text at every position (NaN where not measured).
    promoting       [0.5] t · s, t = κ / (κ + kurtosis_half) with κ >= 0 the excess kurtosis of z = zscore(v_j)
                    over the vocab (κ = 10: t = 0.5), s = Σ_{z > 3} z / Σ_{|z| > 3} |z| (0.5 without a tail)
                    (Gurnee et al. 2024, prediction neurons). Evidence: kurtosis, skew, the top promoted tokens.
    suppression     [0.5] t · (1 − s) (Gurnee et al. 2024, suppression neurons). Evidence: kurtosis, skew, the most
                    suppressed tokens.

The thresholds come from the score distributions of SmolLM2-135M and of randomly initialised models of its shape
and of GPT-2 small's (maxima over all neurons: position 0.19 / 0.31, token_frequency 0.02, entropy 0.09,
promoting and suppression 0.005; so nothing passes there). In SmolLM2 position neurons reach 0.63, promoting 0.86,
suppression 0.85 (all tagged ones in layers 22-29), and 45 neurons (43 of them in layer 29) put more than half of
their output in W_U's bottom 17 singular directions. Two choices follow from that model. The norm is the output
norm, std · ||w_out||, with norm_scale = 2: SmolLM2's w_out norms all lie within 0.4-1.9 times their layer's
median (no outlier like GPT-2's L11N584), and its null-space neurons carry their large outputs through their
activations (std 3-16 against 0.3-1.4 for other last-layer neurons; measured entropy effects up to ±0.9 nats
against ±0.02 for random last-layer neurons). token_frequency is measured against chance: random directions
through SmolLM2's W_U already reach |cos| 0.44 (W_U's top singular directions correlate with frequency; the best
any direction reaches is 0.72), so a raw cosine of 0.5 would be no evidence.

Forward-side measurements are in analysis.neuron_probes. The result is cached per model (config, settings, a weight
fingerprint and any given counts) as JSON under the saelab cache and reused unless `refresh=True`; a damaged
cache file is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from activations.files import atomic_write_text
from activations.models import LoadedModel, cache_dir, model_slug
from analysis.component_capture import block_maps, blocks
from analysis.head_probes import prefix_ids
from analysis.logits import Unembed, unembedding
from analysis.neuron_probes import (
    down_proj,
    entropy_effects,
    mlp_size,
    position_bins,
    position_moments,
    random_rows,
    text_rows,
    unigram_counts,
)

SCHEMA = 1
CHUNK = 128  # neurons per logit-effect matrix (memory: two CHUNK × vocab float buffers)
THRESHOLDS = {
    "position": 0.4,
    "token_frequency": 0.5,
    "entropy": 0.5,
    "promoting": 0.5,
    "suppression": 0.5,
}
NEURON_TYPES = tuple(THRESHOLDS)
PROBES = {
    "position": "min over random tokens and real text of the activation variance explained by position (eta²)",
    "token_frequency": "|cosine| of the direct logit effect with the centred log unigram frequencies, above chance",
    "entropy": "min(share of gain ⊙ w_out in W_U's bottom singular directions, output norm / (2 · layer median))",
    "promoting": "kurtosis of the direct logit effect, t = κ/(κ+10), times the share of its |z| > 3 tail above 0",
    "suppression": "kurtosis of the direct logit effect, t = κ/(κ+10), times the share of its |z| > 3 tail below 0",
}


@dataclass(frozen=True)
class NeuronSettings:
    """Probe sizes and the constants of the scores; part of the cache key."""

    rows: int = 8  # sequences per position probe (random tokens, and text)
    context: int = 256  # tokens per sequence
    skip: int = 1  # positions after the tokenizer's prefix left out of the position statistics
    bins: int = 12  # log-spaced position bins
    text: str = "wikitext-2"  # real text for the position probe and the entropy check
    text_split: str = "test"
    frequency_text: str = "wikitext-2"  # text whose unigram counts give the frequency vector
    frequency_split: str = "validation"
    count_floor: float = 0.5  # count given to tokens the text never holds, before the log
    null_share: float = 0.03  # share of d taken as W_U's near-null space (bottom singular directions)
    norm_scale: float = 2.0  # c: the norm factor is 1 from c times the layer's median output norm up
    chance_directions: int = 1024  # random residual directions giving token_frequency's chance level
    chance_quantile: float = 0.99  # the chance level: this quantile of their |cosine|
    tail_z: float = 3.0  # |z| beyond which a token is in the logit effect's tail
    kurtosis_half: float = 10.0  # excess kurtosis at which t = 0.5
    top_tokens: int = 5  # promoted / suppressed token ids kept as evidence
    effect_neurons: int = 8  # highest entropy scores whose entropy effect is measured
    effect_rows: int = 1  # text sequences of the entropy check
    effect_stds: float = 5.0  # the check raises the activation by this many of its standard deviations
    seed: int = 0


@dataclass
class NeuronCatalogue:
    """Per neuron type a [n_layers, d_mlp] score in [0, 1], its threshold, and per-neuron evidence."""

    model: str
    n_layers: int
    d_mlp: int
    scores: dict[str, Tensor]  # type -> [L, I]
    thresholds: dict[str, float]
    evidence: dict[str, dict[str, Tensor]]  # type -> name -> [L, I] (token ids: [L, I, top_tokens])
    settings: dict

    def tagged(self, kind: str) -> list[tuple[int, int]]:
        """(layer, neuron) of the neurons tagged `kind`, highest score first."""
        flat = self.scores[kind].flatten()
        n = int((flat >= self.thresholds[kind]).sum())
        return [(layer, neuron) for layer, neuron, _ in self.top(kind, n)]

    def top(self, kind: str, n: int) -> list[tuple[int, int, float]]:
        """The n highest-scoring neurons for `kind` as (layer, neuron, score)."""
        return highest(self.scores[kind], n)

    def counts(self, kind: str) -> list[int]:
        """Tagged neurons of `kind` per layer."""
        return (self.scores[kind] >= self.thresholds[kind]).sum(1).tolist()

    def evidence_of(self, kind: str, layer: int, neuron: int) -> dict:
        """The evidence of one neuron for one type: floats (None where not measured) and token-id lists."""
        return {name: _plain(t[layer, neuron]) for name, t in self.evidence.get(kind, {}).items()}

    def rows(self) -> list[dict]:
        """One dict per neuron: layer, neuron and its score for every type."""
        return [
            {"layer": layer, "neuron": j, **{k: round(float(v[layer, j]), 4) for k, v in self.scores.items()}}
            for layer in range(self.n_layers)
            for j in range(self.d_mlp)
        ]

    def to_json(self) -> str:
        data = {
            "schema": SCHEMA,
            "model": self.model,
            "layout": {"n_layers": self.n_layers, "d_mlp": self.d_mlp},
            "settings": self.settings,
            "thresholds": self.thresholds,
            "probes": {k: PROBES.get(k, "") for k in self.scores},
            "scores": {k: _encode(v) for k, v in self.scores.items()},
            "evidence": {k: {n: _encode(v) for n, v in ev.items()} for k, ev in self.evidence.items()},
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> NeuronCatalogue:
        data = json.loads(text)
        if data.get("schema") != SCHEMA:
            raise ValueError(f"neuron catalogue schema {data.get('schema')}, expected {SCHEMA}")
        cat = cls(
            model=data["model"],
            **data["layout"],
            scores={k: _decode(v) for k, v in data["scores"].items()},
            thresholds=data["thresholds"],
            evidence={k: {n: _decode(v) for n, v in ev.items()} for k, ev in data["evidence"].items()},
            settings=data["settings"],
        )
        if any(s.shape != (cat.n_layers, cat.d_mlp) for s in cat.scores.values()):
            raise ValueError("neuron catalogue scores do not match its layout")
        return cat


def highest(score: Tensor, n: int) -> list[tuple[int, int, float]]:
    """The n largest entries of a [L, I] score as (layer, neuron, score), ties in index order."""
    flat = score.flatten()
    order = flat.argsort(descending=True, stable=True)[:n]
    return [(int(i) // score.shape[1], int(i) % score.shape[1], float(flat[i])) for i in order]


def _encode(t: Tensor) -> list:
    """Nested lists: floats rounded to 5 decimals (None for NaN), ints as they are."""
    if not t.is_floating_point():
        return t.tolist()
    a = np.round(t.double().numpy(), 5)
    nan = np.isnan(a)
    return np.where(nan, None, a).tolist() if nan.any() else a.tolist()


def _decode(v: list) -> Tensor:
    """The tensor of nested lists (None read as NaN): int64 when every entry is an int, else float32."""
    a = np.asarray(v)
    if a.dtype.kind not in "iu":
        a = np.asarray(v, dtype=np.float32)
    return torch.from_numpy(a.copy())


def _plain(t: Tensor):
    if t.dim():
        return t.tolist()
    x = t.item()
    return x if not isinstance(x, float) else None if math.isnan(x) else round(x, 5)


# ---- scores from the weights ---------------------------------------------------------------------------------


@dataclass
class Vocab:
    """The unembedding restricted to the tokenizer's tokens, with its vocab-centred Gram matrix and null space."""

    unembed: Unembed
    mean_row: Tensor  # [d] mean of W_U's rows (a logit vector's mean over the vocab is eff · mean_row)
    gram: Tensor  # [d, d] (W_U − mean)^T (W_U − mean), float64
    null: Tensor  # [d, k] the bottom k right singular directions of the vocab-centred W_U


def vocab_geometry(lm: LoadedModel, null_share: float) -> Vocab:
    """The final norm and W_U of `lm` over the tokenizer's tokens (rows past them are padding), the Gram matrix of
    the vocab-centred W_U and its bottom round(null_share · d) eigenvectors (right singular directions)."""
    un = unembedding(lm)
    n = min(len(lm.tokenizer), un.W_U.shape[0])
    un = dataclasses.replace(un, W_U=un.W_U[:n], bias=un.bias[:n])
    mean = un.W_U.mean(0)
    gram = torch.zeros(un.W_U.shape[1], un.W_U.shape[1], dtype=torch.float64, device=mean.device)
    for start in range(0, n, 8192):
        part = un.W_U[start : start + 8192] - mean
        gram += (part.T @ part).double()
    k = max(1, round(null_share * un.W_U.shape[1]))
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues = squared singular values
    return Vocab(un, mean, gram, vectors[:, :k].float())


def effective(un: Unembed, w: Tensor) -> Tensor:
    """[n, d] what the final norm passes on of residual directions w [n, d] (centred under LayerNorm, × gain)."""
    w = w.float()
    return (w - w.mean(-1, keepdim=True) if un.center else w) * un.gain


def logit_shape(vocab: Vocab, W_out: Tensor, settings: NeuronSettings) -> dict[str, Tensor]:
    """Kurtosis, skew, tail shares and top tokens of the z-scored direct logit effect of each column of W_out
    [d, I], CHUNK neurons at a time in two reused [CHUNK, vocab] buffers."""
    un, V = vocab.unembed, vocab.unembed.W_U.shape[0]
    eff = effective(un, W_out.T)  # [I, d]: Unembed.logits(w) = eff @ W_U^T
    var = ((eff.double() @ vocab.gram) * eff.double()).sum(1) / V
    inv = torch.where(var > 1e-30, var.clamp_min(1e-30).rsqrt(), 0).float()  # a zero column stays zero
    scaled, shift = eff * inv[:, None], (eff @ vocab.mean_row) * inv
    n = min(CHUNK, len(eff))
    z_buf, tmp_buf = (torch.empty(n, V, device=eff.device) for _ in range(2))
    parts: dict[str, list[Tensor]] = {k: [] for k in ("m3", "m4", "up", "down", "promoted", "suppressed")}
    for start in range(0, len(eff), n):
        part = slice(start, start + n)
        z, tmp = z_buf[: len(eff[part])], tmp_buf[: len(eff[part])]
        torch.matmul(scaled[part], un.W_U.T, out=z)
        z.sub_(shift[part, None])  # [n, V] z-scores
        torch.mul(z, z, out=tmp)
        parts["m4"].append(torch.linalg.vector_norm(tmp, dim=1).pow(2) / V)
        parts["m3"].append(torch.linalg.vecdot(tmp, z) / V)
        parts["promoted"].append(z.topk(settings.top_tokens, dim=1).indices)
        parts["up"].append(F.threshold_(tmp.copy_(z), settings.tail_z, 0.0).sum(1))  # sum of z over z > tail
        z.neg_()
        parts["suppressed"].append(z.topk(settings.top_tokens, dim=1).indices)
        parts["down"].append(F.threshold_(z, settings.tail_z, 0.0).sum(1))  # sum of |z| over z < -tail
    out = {k: torch.cat(v).cpu() for k, v in parts.items()}
    kurtosis = torch.where(var.cpu() > 1e-30, out["m4"] - 3, 0)
    tail = out["up"] + out["down"]
    share = torch.where(tail > 0, out["up"] / tail.clamp_min(1e-30), 0.5)
    t = kurtosis.clamp_min(0) / (kurtosis.clamp_min(0) + settings.kurtosis_half)
    return {
        "kurtosis": kurtosis,
        "skew": out["m3"],
        "promoting": t * share,
        "suppression": t * (1 - share),
        "promoted_tokens": out["promoted"],
        "suppressed_tokens": out["suppressed"],
    }


def frequency_direction(counts: Tensor, n_vocab: int, floor: float) -> Tensor:
    """[n_vocab] centred log unigram frequency; a token never seen (or past the counts) counts `floor`."""
    c = torch.zeros(n_vocab, dtype=torch.float64)
    c[: min(len(counts), n_vocab)] = counts[:n_vocab].double()
    f = torch.where(c > 0, c, floor).log()
    return (f - f.mean()).float()


def frequency_cosine(vocab: Vocab, W_out: Tensor, f: Tensor) -> Tensor:
    """[I] cosine between each neuron's vocab-centred direct logit effect and the centred log frequency f."""
    eff = effective(vocab.unembed, W_out.T).double()
    g = (vocab.unembed.W_U.T @ f.to(vocab.unembed.W_U.device)).double()  # f is centred, so W_U^T f is centred too
    norm = ((eff @ vocab.gram) * eff).sum(1).clamp_min(0).sqrt() * f.double().norm()
    return torch.where(norm > 1e-30, (eff @ g) / norm.clamp_min(1e-30), 0).float().cpu()


def null_scores(vocab: Vocab, W_out: Tensor, std: Tensor, norm_scale: float) -> dict[str, Tensor]:
    """[I] each: null_fraction, norm_ratio (output norm std · ||w_out|| / its layer's median) and the entropy score."""
    eff = effective(vocab.unembed, W_out.T)
    total = eff.pow(2).sum(1)
    null_fraction = torch.where(total > 0, (eff @ vocab.null).pow(2).sum(1) / total.clamp_min(1e-30), 0)
    norms = W_out.norm(dim=0) * std.to(W_out.device)
    ratio = norms / norms.median().clamp_min(1e-30)
    score = torch.minimum(null_fraction, (ratio / norm_scale).clamp(0, 1))
    return {"null_fraction": null_fraction.cpu(), "norm_ratio": ratio.cpu(), "entropy": score.cpu()}


# ---- the catalogue ------------------------------------------------------------------------------------------


def classify_neurons(
    lm: LoadedModel,
    settings: NeuronSettings | None = None,
    refresh: bool = False,
    cache: bool = True,
    counts: Tensor | None = None,
) -> NeuronCatalogue:
    """Every neuron's scores on every type, from the cache when it holds this model and settings. `counts` [vocab]
    gives the unigram counts instead of tokenising settings.frequency_text."""
    settings = settings or NeuronSettings()
    path = cache_path(lm, settings, counts)
    if cache and not refresh and path.is_file():
        try:
            return NeuronCatalogue.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):  # a damaged cache file is recomputed and replaced
            pass
    result = compute_catalogue(lm, settings, counts)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, result.to_json())
    return result


@torch.inference_mode()
def compute_catalogue(lm: LoadedModel, settings: NeuronSettings, counts: Tensor | None = None) -> NeuronCatalogue:
    """Run the probes and read the weights, layer by layer (no cache)."""
    model, tok = lm.model, lm.tokenizer
    n_layers, d_mlp = mlp_size(model)
    gen = torch.Generator().manual_seed(settings.seed)
    start = len(prefix_ids(tok)) + settings.skip
    context = min(settings.context, lm.max_positions or settings.context)
    bins = position_bins(context, start, settings.bins)
    tokens = random_rows(tok, model.config.vocab_size, settings.rows, context, gen)
    randoms = position_moments(model, tokens, bins)
    text = text_rows(settings.text, settings.text_split, tok, settings.rows, context)
    texts = position_moments(model, text, bins)
    eta_random, eta_text = randoms.eta_squared(), texts.eta_squared()
    peak = randoms.first[randoms.bin_means().argmax(1)].float()  # [L, I]

    vocab = vocab_geometry(lm, settings.null_share)
    frequency_source = "given" if counts is not None else f"{settings.frequency_text}:{settings.frequency_split}"
    n_vocab = vocab.unembed.W_U.shape[0]
    if counts is None:
        counts = unigram_counts(settings.frequency_text, settings.frequency_split, tok, n_vocab)
    f = frequency_direction(counts, n_vocab, settings.count_floor)
    stacked = weight_scores(lm, vocab, f, texts.std(), settings)
    chance = frequency_chance(vocab, f, settings, gen)
    effect = measured_effects(lm, text[: settings.effect_rows], stacked["entropy"], texts.std(), start, settings)
    scores = {
        "position": torch.minimum(eta_random, eta_text),
        "token_frequency": ((stacked["cosine"].abs() - chance) / (1 - chance)).clamp(0, 1),
        "entropy": stacked["entropy"],
        "promoting": stacked["promoting"],
        "suppression": stacked["suppression"],
    }
    evidence = {
        "position": {"peak_position": peak, "eta_random": eta_random, "eta_text": eta_text},
        "token_frequency": {"cosine": stacked["cosine"]},
        "entropy": {
            "null_fraction": stacked["null_fraction"],
            "norm_ratio": stacked["norm_ratio"],
            "entropy_effect": effect,
        },
        "promoting": {"kurtosis": stacked["kurtosis"], "skew": stacked["skew"], "tokens": stacked["promoted_tokens"]},
        "suppression": {
            "kurtosis": stacked["kurtosis"],
            "skew": stacked["skew"],
            "tokens": stacked["suppressed_tokens"],
        },
    }
    return NeuronCatalogue(
        model=lm.name,
        n_layers=n_layers,
        d_mlp=d_mlp,
        scores={k: scores[k].float().nan_to_num(0).clamp(0, 1) for k in NEURON_TYPES},
        thresholds=dict(THRESHOLDS),
        evidence=evidence,
        settings={
            **dataclasses.asdict(settings),
            "context_used": context,
            "text_rows_used": len(text),
            "null_directions": vocab.null.shape[1],
            "frequency_tokens": int(counts.sum()),
            "frequency_source": frequency_source,
            "frequency_chance": round(chance, 4),
        },
    )


def weight_scores(lm: LoadedModel, vocab: Vocab, f: Tensor, std: Tensor, settings: NeuronSettings) -> dict[str, Tensor]:
    """[L, I] (token ids [L, I, top_tokens]) per name: every score and evidence read from the weights (and the
    activations' std on text [L, I] for the output norms), one layer's W_out at a time."""
    layers = []
    for layer in range(len(blocks(lm.model))):
        W_out = block_maps(lm.model, layer).W_out.to(vocab.unembed.W_U.device)  # [d, I]
        row = logit_shape(vocab, W_out, settings)
        row["cosine"] = frequency_cosine(vocab, W_out, f)
        row.update(null_scores(vocab, W_out, std[layer], settings.norm_scale))
        layers.append(row)
    return {k: torch.stack([r[k] for r in layers]) for k in layers[0]}


def frequency_chance(vocab: Vocab, f: Tensor, settings: NeuronSettings, gen: torch.Generator) -> float:
    """The |cosine| with the frequency direction that random residual directions reach through this W_U (its
    `chance_quantile`): W_U's top singular directions correlate with frequency, so chance can be far above 0."""
    d = vocab.unembed.W_U.shape[1]
    directions = torch.randn(d, settings.chance_directions, generator=gen).to(vocab.unembed.W_U.device)
    return float(frequency_cosine(vocab, directions, f).abs().quantile(settings.chance_quantile))


def measured_effects(
    lm: LoadedModel, text: Tensor, entropy: Tensor, std: Tensor, start: int, settings: NeuronSettings
) -> Tensor:
    """[L, I] entropy effect (nats) of the `effect_neurons` highest entropy scores, raised by effect_stds × their
    activation std; NaN elsewhere."""
    effect = torch.full(entropy.shape, math.nan)
    chosen = [(a, b, settings.effect_stds * float(std[a, b])) for a, b, _ in highest(entropy, settings.effect_neurons)]
    if chosen:
        effect[[a for a, _, _ in chosen], [b for _, b, _ in chosen]] = entropy_effects(lm.model, text, chosen, start)
    return effect


def cache_path(lm: LoadedModel, settings: NeuronSettings, counts: Tensor | None = None) -> Path:
    """cache_dir()/neurons/<model>-<hash of config, settings, a weight fingerprint and any given counts>.json"""
    given = None if counts is None else hashlib.sha1(counts.double().numpy().tobytes()).hexdigest()
    key = json.dumps(
        [SCHEMA, lm.model.config.to_json_string(use_diff=False), dataclasses.asdict(settings), _fingerprint(lm), given]
    )
    slug = model_slug(lm.name)
    return cache_dir() / "neurons" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


@torch.inference_mode()
def _fingerprint(lm: LoadedModel) -> list[float]:
    """Cheap sums of the embedding and of every layer's MLP output weights, so a retrained model misses."""
    n_layers, _ = mlp_size(lm.model)
    sums = [float(lm.model.get_input_embeddings().weight.float().sum())]
    return sums + [round(float(down_proj(lm.model, i).weight.float().abs().sum()), 3) for i in range(n_layers)]
