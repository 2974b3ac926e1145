"""The language models behind `sae explain`: a local HF causal LM (LocalBackend) or an OpenAI-compatible server
(HTTPBackend), both behind one small Backend protocol of greedy chat replies and first-token choice log-probs.

Depends on activations (model loading, UserError) and the standard library only; nothing downstream imports back.
"""

from __future__ import annotations

import http.client
import inspect
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from activations.config import pick_device
from activations.errors import UserError
from activations.models import LoadedModel, load_model

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
FLOOR = -30.0  # the log-probability given to a choice the server did not list among its top tokens
TOP_LOGPROBS = 10


class Backend(Protocol):
    """A chat model: greedy replies, and how likely each of a few fixed answers is as the reply's start."""

    name: str  # recorded with results, e.g. "local:smollm2-135m" or "http:gpt-4o-mini@https://..."

    def chat(self, conversations: list[list[Message]], max_tokens: int = 64) -> list[str]:
        """Greedy (temperature 0) replies, one per conversation, in order."""
        ...

    def choice_logprobs(self, conversations: list[list[Message]], choices: list[str]) -> list[list[float]]:
        """For each conversation, log P(choice) as the first token(s) of the assistant's reply, per choice."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`, for the cost estimate printed before a run."""
        ...

    def slot_logprobs(
        self, conversations: list[list[Message]], replies: list[list[str]], fill: str, choices: list[str]
    ) -> list[list[list[float]]] | None:
        """For each conversation, with the assistant's reply written out as segment + fill + segment + fill ...,
        log P(choice) among `choices` (single tokens) in place of each fill; None when the backend cannot."""
        ...


class LocalBackend:
    """A Hugging Face causal LM run here, batched with left padding.

    Prompts use the tokenizer's chat template (the embedded SmolLM2-135M-Instruct has one, ChatML); a model
    without a template gets a plain "System: ...\\nUser: ...\\nAssistant:" prompt instead. One call at a time
    runs the model (a lock), so a backend may be shared between threads.
    """

    def __init__(self, model: str = "smollm2-135m", device: str | None = None, batch_size: int = 8):
        self._init(load_model(model, device=pick_device(device or "auto")), batch_size)

    @classmethod
    def from_loaded(cls, lm: LoadedModel, batch_size: int = 8) -> LocalBackend:
        """A backend on an already loaded model (e.g. the one the SAE was trained on), without loading it again."""
        backend = cls.__new__(cls)
        backend._init(lm, batch_size)
        return backend

    def _init(self, lm: LoadedModel, batch_size: int) -> None:
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} is not positive; use 1 or more.")
        self.lm = lm
        self.name = f"local:{lm.name}"
        self.batch_size = batch_size
        self._lock = threading.Lock()
        tok = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.has_template = bool(getattr(tok, "chat_template", None))
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        stops = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)  # e.g. an end-of-turn id
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        self.stop_ids = sorted({*stops, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})

    def prompt_ids(self, conversation: list[Message]) -> list[int]:
        """The token ids of a conversation followed by the start of the assistant's turn."""
        tok = self.lm.tokenizer
        if self.has_template:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in conversation) + "Assistant:"
        ids = tok(text, add_special_tokens=not self.has_template)["input_ids"]
        limit = self.lm.max_positions
        if limit is not None and len(ids) >= limit:
            raise UserError(
                f"a prompt of {len(ids)} tokens is longer than {self.lm.name} allows ({limit}); "
                "show fewer or shorter examples, or use a model with a longer context."
            )
        return ids

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` by the model's own tokenizer (exact)."""
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), both (B, T), sequences right-aligned behind pad tokens."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        return ids.to(self.lm.device), mask.to(self.lm.device)

    def _batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices into `seqs` in batches of similar length (less padding); callers put results back in order."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def chat(self, conversations: list[list[Message]], max_tokens: int = 64) -> list[str]:
        """Greedy replies, generated in length-sorted batches and stopped at EOS (or the end-of-turn id)."""
        prompts = [self.prompt_ids(c) for c in conversations]
        replies: list[str] = [""] * len(prompts)
        tok = self.lm.tokenizer
        with self._lock:
            for batch in self._batches(prompts):
                ids, mask = self._left_pad([prompts[i] for i in batch])
                out = self.lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.stop_ids or None,
                )
                for row, i in enumerate(batch):
                    replies[i] = tok.decode(out[row, ids.shape[1] :], skip_special_tokens=True).strip()
        return replies

    @torch.no_grad()
    def choice_logprobs(self, conversations: list[list[Message]], choices: list[str]) -> list[list[float]]:
        """Sum of log P(token) over each choice's tokens after the prompt. A choice's last token needs no input
        position, so single-token choices (e.g. Yes / No) share one forward of the prompt alone, and only the
        last len(choice) positions go through the unembedding (the full (B, T, vocab) logits would cost more
        than the rest of the model)."""
        tok = self.lm.tokenizer
        choice_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(not ids for ids in choice_ids):
            raise UserError(f"a choice in {choices!r} is empty after tokenising; give non-empty answer words.")
        prompts = [self.prompt_ids(c) for c in conversations]
        seqs: list[list[int]] = []  # distinct inputs: prompt + all but the last token of a choice
        needed: list[int] = []  # positions scored at the end of each input: len(choice)
        where: dict[tuple[int, ...], int] = {}
        for p in prompts:
            for ids in choice_ids:
                key = tuple(p + ids[:-1])
                if key not in where:
                    where[key] = len(seqs)
                    seqs.append(list(key))
                    needed.append(len(ids))
        logprobs: list[torch.Tensor] = [torch.empty(0)] * len(seqs)  # (needed_i, vocab) log-softmax
        with self._lock:
            for batch in self._batches(seqs):
                ids, mask = self._left_pad([seqs[i] for i in batch])
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the real tokens' positions
                keep = max(needed[i] for i in batch)
                logits = self._logits(ids, mask, positions, keep)  # (B, keep, vocab): the last `keep` positions
                for row, i in enumerate(batch):
                    logprobs[i] = logits[row, keep - needed[i] :].float().log_softmax(-1).cpu()
        result = []
        for p in prompts:
            row = []
            for ids in choice_ids:
                lp = logprobs[where[tuple(p + ids[:-1])]]
                row.append(sum(float(lp[k, t]) for k, t in enumerate(ids)))
            result.append(row)
        return result

    @torch.no_grad()
    def slot_logprobs(
        self, conversations: list[list[Message]], replies: list[list[str]], fill: str, choices: list[str]
    ) -> list[list[list[float]]]:
        """Bills et al.'s "all at once" read-out: one forward per conversation over the prompt and the reply
        written out with `fill` as a placeholder after each segment; at each placeholder, the log-softmax over the
        choices' logits only (the unembedding runs for those few tokens, not the whole vocabulary)."""
        tok = self.lm.tokenizer
        choice_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(len(ids) != 1 for ids in choice_ids):
            raise UserError(f"slot choices {choices!r} must each be one token of {self.lm.name}.")
        fill_ids = tok(fill, add_special_tokens=False)["input_ids"]
        seqs, slots = [], []
        for conversation, segments in zip(conversations, replies):
            ids = self.prompt_ids(conversation)
            where = []
            for segment in segments:
                ids = ids + tok(segment, add_special_tokens=False)["input_ids"]
                where.append(len(ids) - 1)  # the position whose next-token distribution is the slot's
                ids = ids + fill_ids
            seqs.append(ids)
            slots.append(where)
        head = self.lm.model.get_output_embeddings()
        rows = torch.tensor([c[0] for c in choice_ids], device=head.weight.device)
        weight = head.weight[rows]
        bias = head.bias[rows] if getattr(head, "bias", None) is not None else None
        result: list[list[list[float]]] = [[] for _ in seqs]
        with self._lock:
            for batch in self._batches(seqs):
                ids, mask = self._left_pad([seqs[i] for i in batch])
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                keep = {"logits_to_keep": 1} if self._keeps_logits else {}  # the vocabulary at the last position only
                out = self.lm.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    output_hidden_states=True,
                    use_cache=False,
                    **keep,
                )
                final = out.hidden_states[-1]  # after the final norm in HF causal LMs; checked against the logits
                check = torch.nn.functional.linear(final[:, -1], weight, bias)
                if not torch.allclose(check.float(), out.logits[:, -1, rows].float(), atol=1e-3, rtol=1e-3):
                    raise RuntimeError(f"{self.lm.name}: the last hidden state is not what its unembedding reads")
                for row, i in enumerate(batch):
                    offset = ids.shape[1] - len(seqs[i])
                    picked = final[row, [offset + p for p in slots[i]]]
                    logits = torch.nn.functional.linear(picked, weight, bias).float()
                    result[i] = logits.log_softmax(-1).cpu().tolist()
        return result

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits at the last `keep` positions; models whose forward lacks `logits_to_keep` compute all of them."""
        if self._keeps_logits:
            return self.lm.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False
            ).logits
        return self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[
            :, -keep:
        ]


class HTTPBackend:
    """An OpenAI-compatible server: `POST {api_base}/chat/completions`, `concurrency` requests in flight.

    The API key is read from $`api_key_env` at each request, never stored or printed. Connection errors, dropped
    connections, HTTP 429 and 5xx are retried with jittered exponential backoff (`backoff` × 2^attempt seconds);
    401/403 and other 4xx fail at once with a UserError.
    """

    def __init__(
        self,
        api_base: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 4,
        retries: int = 4,
        timeout: float = 60.0,
        backoff: float = 0.5,
    ):
        if not api_base.startswith(("http://", "https://")):
            raise UserError(f"--api-base {api_base!r} is not an http(s) URL; give e.g. http://localhost:8000/v1.")
        if concurrency < 1 or retries < 0:
            raise UserError(f"concurrency {concurrency} / retries {retries}: use concurrency >= 1 and retries >= 0.")
        self.api_base = api_base.rstrip("/")
        self.url = f"{self.api_base}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.name = f"http:{model}@{self.api_base}"

    def count_tokens(self, text: str) -> int:
        """Roughly four characters a token (the server's tokenizer is unknown here)."""
        return math.ceil(len(text) / 4)

    def slot_logprobs(
        self, conversations: list[list[Message]], replies: list[list[str]], fill: str, choices: list[str]
    ) -> None:
        """Chat endpoints give log-probs of generated tokens only, not of a reply we write: simulation is skipped."""
        return None

    def chat(self, conversations: list[list[Message]], max_tokens: int = 64) -> list[str]:
        """Greedy replies, one request per conversation, `concurrency` at a time."""

        def one(messages: list[Message]) -> str:
            body = self._post({"messages": messages, "max_tokens": max_tokens})
            return (_first_choice(body, self.url).get("message", {}).get("content") or "").strip()

        return self._map(one, conversations)

    def choice_logprobs(self, conversations: list[list[Message]], choices: list[str]) -> list[list[float]]:
        """The first reply token's top-10 log-probs, matched to choices by stripped, case-insensitive text (all
        spellings that match are summed); a choice not listed gets min(FLOOR, lowest listed). A server that returns
        no log-probs gets 0.0 for the choice its one-token reply starts with and FLOOR for the others."""
        wanted = [c.strip().lower() for c in choices]

        def one(messages: list[Message]) -> list[float]:
            body = self._post({"messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": TOP_LOGPROBS})
            choice = _first_choice(body, self.url)
            content = (choice.get("logprobs") or {}).get("content") or []
            top = (content[0].get("top_logprobs") or []) if content else []
            if not top:
                reply = (choice.get("message", {}).get("content") or "").strip().lower()
                starts = [bool(w) and reply.startswith(w) for w in wanted]
                return [0.0 if s else FLOOR for s in starts]
            listed = [(str(t.get("token", "")).strip().lower(), float(t["logprob"])) for t in top]
            return [_match(listed, w) for w in wanted]

        return self._map(one, conversations)

    def _map(self, fn, items: list) -> list:
        """fn over items with up to `concurrency` in flight; results in the items' order."""
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _post(self, payload: dict) -> dict:
        """One chat completion, retried on transient failures; user-fixable failures become one-line UserErrors."""
        data = json.dumps({"model": self.model, "temperature": 0, **payload}).encode()
        last, retry_after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt - 1, retry_after))
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            if key:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise UserError(self._auth_message(e.code, bool(key))) from None
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code}"
                    retry_after = e.headers.get("Retry-After") if e.code == 429 and e.headers else None
                    continue
                detail = _error_text(e)
                raise UserError(
                    f"the server at {self.url} rejected the request (HTTP {e.code}{': ' + detail if detail else ''}); "
                    f"check --api-base and that it serves the model {self.model!r}."
                ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                last, retry_after = f"{type(reason).__name__}: {reason}".rstrip(": "), None
                continue
            try:
                return json.loads(raw)
            except ValueError:
                raise UserError(
                    f"the server at {self.url} did not answer with JSON; point --api-base at an OpenAI-compatible "
                    "API (usually ending in /v1)."
                ) from None
        if last.startswith("HTTP"):
            raise UserError(
                f"the server at {self.url} kept answering {last} after {self.retries + 1} attempts; "
                "try again later or lower --concurrency."
            )
        raise UserError(
            f"could not reach the server at {self.url} after {self.retries + 1} attempts ({last}); check that it is "
            "running, or point --api-base at an OpenAI-compatible server (e.g. http://localhost:8000/v1)."
        )

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Jittered exponential backoff; a 429's numeric Retry-After (up to 60 s) is honoured when longer."""
        delay = self.backoff * 2**attempt * (0.5 + random.random())
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(60.0, float(retry_after)))
        return delay

    def _auth_message(self, code: int, had_key: bool) -> str:
        """The one line for a 401/403: no key configured, the variable unset, or the key refused."""
        var = self.api_key_env
        if var is None:
            return (
                f"the server at {self.url} demands an API key (HTTP {code}); pass --api-key-env NAME with it in $NAME."
            )
        if not had_key:
            return f"the server at {self.url} demands an API key (HTTP {code}) but ${var} is not set; set ${var} to it."
        return f"the server at {self.url} refused the API key in ${var} (HTTP {code}); set ${var} to a valid key."


def _first_choice(body: dict, url: str) -> dict:
    """choices[0] of a chat completion, or a UserError saying the server does not speak the protocol."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise UserError(
            f"the server at {url} answered without 'choices'; point --api-base at an OpenAI-compatible chat API."
        )
    return choices[0]


def _error_text(e: urllib.error.HTTPError) -> str:
    """The first line of an HTTP error's body (an OpenAI-style error message when there is one), at most 200 chars."""
    try:
        raw = e.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return ""
    try:
        message = json.loads(raw).get("error", {}).get("message", "")
    except (ValueError, AttributeError):
        message = raw
    return (str(message).strip().splitlines() or [""])[0][:200]


def _match(listed: list[tuple[str, float]], wanted: str) -> float:
    """log P(wanted) from (token, logprob) pairs: all matching spellings summed, else below the lowest listed."""
    hits = [lp for token, lp in listed if token == wanted]
    if not hits:
        return min(FLOOR, min(lp for _, lp in listed))
    top = max(hits)
    return top + math.log(sum(math.exp(v - top) for v in hits))


def backend_from_options(
    explainer: str,
    api_base: str | None,
    api_key_env: str | None,
    device: str | None,
    *,
    concurrency: int = 4,
    batch_size: int = 8,
) -> Backend:
    """The server's model `explainer` when --api-base is given, else `explainer` loaded locally (HF id or folder)."""
    if api_base:
        return HTTPBackend(api_base, explainer, api_key_env, concurrency=concurrency)
    return LocalBackend(explainer, device=device, batch_size=batch_size)
