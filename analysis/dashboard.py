"""The static feature dashboard: one JSON-like record per feature, written as lazily loaded .js chunks.

Layout of `dashboard/`: `index.html` (the template, unchanged), `data/index.js` (run summary and one
short row per feature, for the searchable list) and `data/features_NNNNN.js` (full records, `chunk_size`
features each). Pages opened from disk may not fetch(), so each data file is a script calling
`SAELAB.index(...)` / `SAELAB.chunk(n, [...])`. `circuits.js`, beside index.html and so kept when data/ is
rewritten, links the circuit pages of `sae circuit` (analysis.dashboard_circuits).

A record (built by `RecordBuilder` / `feature_record`): {"id", "density", "count", "mean", "max",
"hist": {"max", "counts"}, "top": [example], "intervals": [{"lo", "hi", "count", "examples"}],
"logits": {"promoted": [[token, weight]], "suppressed": [...]}, "tags": [...]}, an example being
{"act", "ctx", "pos", "doc", "doc_pos", "center", "tokens", "acts"}. Other analyses add fields or tags
through `annotators` (functions record -> None; unknown fields are shown as JSON on the page) or a
`features/tags.json` file (`{"12": ["induction", {"name": "copying", "note": "...", "score": 0.8}]}`; the
mechanism catalogue's `features/mechanisms.json` is read too). A tag is a string or an object with "name"; a
tag with a `flag` (its sources disagree, analysis.component_evidence) is shown with a warning. `sae inspect` adds
`sources` (analysis.dashboard_sources: the feature's components as a bar chart) and the heads & neurons page.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import torch

from activations.errors import UserError
from analysis.feature_stats import FeatureStats
from analysis.logits import TopLogits

Annotator = Callable[[dict], None]
TAG_FILES = ("tags.json", "mechanisms.json")  # in features/: any analysis's tags, the mechanism catalogue's


class TokenText:
    """Token id -> display string (each id decoded alone, cached)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return self.cache[token_id]


def _sig(t: torch.Tensor, digits: int = 4) -> list:
    """Values rounded to `digits` significant digits, as (nested) Python floats with short JSON forms."""
    x = t.double()
    mag = torch.where(x != 0, x.abs().log10().floor(), torch.zeros_like(x))
    factor = torch.pow(10.0, digits - 1 - mag)
    return ((x * factor).round() / factor).tolist()


class RecordBuilder:
    """Builds feature records a slice at a time: tensors become Python lists once per slice, not per value."""

    def __init__(self, stats: FeatureStats, logits: TopLogits | None, tokenizer):
        self.stats, self.logits = stats, logits
        self.text = tokenizer if isinstance(tokenizer, TokenText) else TokenText(tokenizer)

    def record(self, i: int) -> dict:
        """Everything the dashboard shows for feature i, as plain JSON-able data; `tags` is open for annotators."""
        return self.records(i, i + 1)[0]

    def records(self, start: int, stop: int) -> list[dict]:
        """The records of features start..stop-1."""
        s, sl = self.stats, slice(start, stop)
        n, left, T = s.cfg.intervals, s.cfg.left, s.context_size
        text = self.text

        def examples(act, g, doc, doc_pos, tokens, window_acts) -> list:
            """Per feature, its examples ([F, k, ...] tensors flattened to [F, k*, ...] lists)."""
            out = []
            for row in zip(
                _sig(act), g.tolist(), doc.tolist(), doc_pos.tolist(), tokens.tolist(), _sig(window_acts, 3)
            ):
                out.append([_example(*ex, left, T, text) for ex in zip(*row) if ex[1] >= 0])
            return out

        top = examples(
            s.top_act[sl], s.top_g[sl], s.top_doc[sl], s.top_doc_pos[sl], s.top_tokens[sl], s.top_window_acts[sl]
        )
        F, m = stop - start, s.sample_key.shape[2]
        flat = lambda t: t[sl].reshape(F, n * m, *t.shape[3:])  # noqa: E731
        sampled = examples(
            flat(s.sample_act),
            flat(s.sample_g),
            flat(s.sample_doc),
            flat(s.sample_doc_pos),
            flat(s.sample_tokens),
            flat(s.sample_window_acts),
        )
        filled = s.sample_g[sl].ge(0).sum(2).tolist()  # [F, n] examples per interval
        mx = s.max[sl]
        edges = _sig(mx.double()[:, None] * torch.arange(n + 1, dtype=torch.float64) / n)
        logits = self._logits(sl, F)
        records = []
        for f, (density, count, mean, peak, hist, counts) in enumerate(
            zip(
                _sig(s.density[sl]),
                s.count[sl].tolist(),
                _sig(s.mean[sl]),
                _sig(mx),
                s.hist[sl].tolist(),
                s.interval_count[sl].tolist(),
            )
        ):
            intervals, taken = [], 0
            for j in range(n):
                intervals.append(
                    {
                        "lo": edges[f][j],
                        "hi": edges[f][j + 1],
                        "count": counts[j],
                        "examples": sampled[f][taken : taken + filled[f][j]],
                    }
                )
                taken += filled[f][j]
            records.append(
                {
                    "id": start + f,
                    "density": density,
                    "count": count,
                    "mean": mean,
                    "max": peak,
                    "hist": {"max": peak, "counts": hist},
                    "top": top[f],
                    "intervals": intervals,
                    "logits": logits[f],
                    "tags": [],
                }
            )
        return records

    def _logits(self, sl: slice, F: int) -> list[dict]:
        """Per feature of the slice: {"promoted": [[token, weight], ...], "suppressed": [...]}."""
        if self.logits is None:
            return [{"promoted": [], "suppressed": []} for _ in range(F)]
        out = [{} for _ in range(F)]
        for kind in ("promoted", "suppressed"):
            ids, values = getattr(self.logits, f"{kind}_ids")[sl].tolist(), _sig(getattr(self.logits, kind)[sl])
            for f in range(F):
                out[f][kind] = [[self.text(t), v] for t, v in zip(ids[f], values[f])]
        return out


def _example(
    act: float,
    g: int,
    doc: int,
    doc_pos: int,
    tokens: list[int],
    window_acts: list[float],
    left: int,
    context_size: int,
    text: TokenText,
) -> dict:
    """One example as the page shows it: the window's tokens (outside-context slots dropped), activations,
    provenance."""
    inside = [i for i, t in enumerate(tokens) if t >= 0]
    ctx, pos = divmod(g, context_size)
    return {
        "act": act,
        "ctx": ctx,
        "pos": pos,
        "doc": doc,
        "doc_pos": doc_pos,
        "center": left - inside[0],
        "tokens": [text(tokens[i]) for i in inside],
        "acts": [window_acts[i] for i in inside],
    }


def feature_record(stats: FeatureStats, logits: TopLogits | None, i: int, tokenizer) -> dict:
    """The dashboard record of feature i (see RecordBuilder; build many with RecordBuilder.records)."""
    return RecordBuilder(stats, logits, tokenizer).record(i)


def read_feature_tags(*features_dirs: str | Path) -> dict[int, list]:
    """The dashboard's tags per feature: each folder's tags.json ({feature id: [tag, ...]}) and the mechanism
    catalogue's mechanisms.json (the same mapping under "tags"; only the first folder's, the newest run of the
    detectors), merged; {} when there are none. analysis.catalogue.load_tags reads one SAE's whole catalogue result."""
    tags: dict[int, list] = {}
    seen = set()
    for folder in features_dirs:
        for name in TAG_FILES:
            path = Path(folder) / name
            if not path.is_file() or path.resolve() in seen or (name == "mechanisms.json" and name in seen):
                continue
            seen.update({path.resolve(), name})
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                raw = raw["tags"] if isinstance(raw.get("tags"), dict) else raw
                for k, v in raw.items():
                    tags.setdefault(int(k), []).extend(v if isinstance(v, list) else [v])
            except (ValueError, TypeError, AttributeError) as e:
                raise UserError(
                    f"{path} is not a JSON object of feature id -> list of tags ({e}); fix or delete it."
                ) from None
    return tags


def _index_row(record: dict) -> list:
    """[id, density, max, mean, label, search text, tag names]: what the list shows and searches."""
    centers = []
    for ex in record["top"]:
        tok = ex["tokens"][ex["center"]].strip() or repr(ex["tokens"][ex["center"]])
        if tok not in centers:
            centers.append(tok)
    promoted = [t.strip() or repr(t) for t, _ in record["logits"]["promoted"][:3]]
    label = " ".join(centers[:4]) + (f"  → {' '.join(promoted)}" if promoted else "")
    tags = [t if isinstance(t, str) else str(t.get("name", "")) for t in record["tags"]]
    search = " ".join(centers + [t for t, _ in record["logits"]["promoted"]])
    explained = (record.get("explanation") or {}).get("text", "")
    if explained:  # the list shows and searches the explanation first
        label, search = f"{explained} · {label}", f"{explained} {search}"
    return [record["id"], record["density"], record["max"], record["mean"], label, search, tags]


def _js(call: str, *args) -> str:
    return f"SAELAB.{call}({', '.join(json.dumps(a, ensure_ascii=False, separators=(',', ':')) for a in args)});\n"


def write_dashboard(
    out: str | Path,
    stats: FeatureStats,
    logits: TopLogits | None,
    tokenizer,
    *,
    title: str,
    subtitle: str = "",
    summary: dict | None = None,
    plots: Iterable[tuple[str, str]] = (),
    annotators: Iterable[Annotator] = (),
    tags: dict[int, list] | None = None,
    chunk_size: int = 64,
    catalogue: list[dict] | None = None,
    components: dict | None = None,
    explanations: dict | None = None,
) -> Path:
    """Write the dashboard folder `out` (replacing its data/) and return the path of index.html.

    `plots` are (title, path relative to `out`) pairs shown on the overview page; `catalogue` is the
    mechanisms page (analysis.catalogue.dashboard_catalogue) and `components` the components page (heads and
    neurons with the features they feed, analysis.dashboard_sources.components_page) and `explanations` the score
    distributions (analysis.dashboard_explanations), each shown when given.
    """
    out = Path(out)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    builder = RecordBuilder(stats, logits, tokenizer)
    annotators, tags = list(annotators), tags or {}
    rows = []
    for start in range(0, stats.d_sae, chunk_size):
        records = builder.records(start, min(start + chunk_size, stats.d_sae))
        for record in records:
            record["tags"].extend(tags.get(record["id"], []))
            for annotate in annotators:
                annotate(record)
            rows.append(_index_row(record))
        (data / f"features_{start // chunk_size:05d}.js").write_text(
            _js("chunk", start // chunk_size, records), encoding="utf-8"
        )
    meta = {
        "title": title,
        "subtitle": subtitle,
        "chunk_size": chunk_size,
        "summary": summary or {},
        "plots": [{"title": t, "src": src} for t, src in plots],
        "features": rows,
        "catalogue": catalogue or [],
        "components": components,
        "explanations": explanations,
    }
    (data / "index.js").write_text(_js("index", meta), encoding="utf-8")
    template = resources.files("analysis").joinpath("dashboard_template.html").read_text(encoding="utf-8")
    (out / "index.html").write_text(template, encoding="utf-8")
    return out / "index.html"
