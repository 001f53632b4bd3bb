"""Tokenization with prompt masking, run in a Ray Data actor pool.

A conversation is rendered through the tokenizer's chat template one assistant turn at a
time: the text the template adds for a turn after the prompt of that turn is the part
trained on (label = token id); everything else gets label -100. This works with any
template, including those without `{% generation %}` markers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ray_app.data.formats import (
    RecordError,
    Turn,
    content_key,
    detect_format,
    parse_line,
    to_completion,
    to_preference,
    to_turns,
)

IGNORE = -100
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def segments(turns: list[Turn], tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the full rendered record."""
    return render(turns, tokenizer)[0]


def render(turns: list[Turn], tokenizer,
           stop_after_tokens: int | None = None) -> tuple[list[tuple[str, bool]], bool]:
    """(pieces, cut): the (text, trained) pieces of the record, and whether rendering
    stopped early because the pieces already held more than `stop_after_tokens` tokens.

    Each trained turn renders the conversation up to it, so a record of n turns costs n^2
    message renders (10,000 turns: minutes). Beyond the token limit the rest would be
    truncated away or the record rejected, so the pieces are counted at doubling lengths
    and rendering stops there: the first `stop_after_tokens` tokens are the same."""
    if turns[0].role == "text":
        bos = tokenizer.bos_token or ""
        return [(bos, False), (turns[0].content + (tokenizer.eos_token or ""), True)], False
    if not getattr(tokenizer, "chat_template", None):
        return _plain_segments(turns, tokenizer), False
    messages = [{"role": t.role, "content": t.content} for t in turns]
    pieces: list[tuple[str, bool]] = []
    done = ""
    check_at = stop_after_tokens
    for i, turn in enumerate(turns):
        if not turn.trained:
            continue
        # An assistant turn's header comes with the generation prompt, so it is not trained.
        prompt = _apply_template(tokenizer, messages[:i],
                                 add_generation_prompt=turn.role == "assistant") if i else ""
        full = _apply_template(tokenizer, messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RecordError("the tokenizer's chat template does not render conversations "
                              "prefix by prefix, so prompt tokens cannot be masked")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
        if check_at is not None and len(done) >= check_at:
            if (_count_tokens(pieces, tokenizer) > stop_after_tokens
                    and any(t.trained for t in turns[i + 1:])):
                return [p for p in pieces if p[0]], True
            check_at = 2 * len(done)
    return [p for p in pieces if p[0]], False


def _apply_template(tokenizer, messages: list[dict[str, str]], **kwargs) -> str:
    """The template's rendering, or RecordError with the template's own message: templates
    refuse conversations they cannot take (Mistral: roles must alternate; Gemma: no system
    role) through jinja errors, and being foreign code they may raise anything else."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - see the docstring
        detail = str(err) if type(err).__module__.startswith("jinja2") else \
            f"{type(err).__name__}: {err}"
        raise RecordError(f"chat template error: {detail}") from None


def _count_tokens(pieces: list[tuple[str, bool]], tokenizer) -> int:
    texts = [text for text, _ in pieces if text]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) \
        if texts else 0


def chat_template_warning(tokenizer) -> str | None:
    """The warning to show when `tokenizer` has no chat template (base models), else None.

    Records other than plain text are then rendered with PLAIN_PROMPT; the data report
    carries this warning when any such record was accepted."""
    if getattr(tokenizer, "chat_template", None):
        return None
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    return (f"The tokenizer {name} has no chat template: alpaca, messages and preference "
            f"records are rendered as {PLAIN_PROMPT!r} + answer + EOS (the prompt turns "
            "joined by blank lines), and only assistant turns are trained, whatever "
            "data.train_on_roles says. To train in a chat format, set model.tokenizer to a "
            "tokenizer that has a chat template (such as the instruct model's), or add a "
            "chat_template.jinja to the tokenizer folder.")


def _plain_segments(turns: list[Turn], tokenizer) -> list[tuple[str, bool]]:
    """Alpaca-style prompt for tokenizers without a chat template (base models); only
    assistant turns are trained here, whatever data.train_on_roles says."""
    pieces: list[tuple[str, bool]] = [(tokenizer.bos_token or "", False)]
    pending: list[str] = []
    for turn in turns:
        if turn.role == "assistant":
            prompt = PLAIN_PROMPT.format(prompt="\n\n".join(pending))
            pieces += [(prompt, False), (turn.content + (tokenizer.eos_token or ""), True)]
            pending = []
        else:
            pending.append(turn.content)
    return [p for p in pieces if p[0]]


def tokenize_segments(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    ids, labels = _join(pieces, iter(encoded))
    return ids.tolist(), labels.tolist()


def split_of(key: str, eval_fraction: float) -> tuple[str, str]:
    """(content hash, split): the split is a pure function of the content."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    bucket = int(digest[:8], 16) / 0x1_0000_0000
    return digest, ("eval" if bucket < eval_fraction else "train")


def origin_of(role: str, source_id: int, line: int) -> int:
    """A record's place in the input as one sortable int64: eval shards first, then by
    shard and line. Dedup keeps the copy with the smallest origin, so a record that is in
    both an eval shard and a train shard stays in eval and leaves train."""
    return ((0 if role == "eval" else 1) << 62) | (source_id << 40) | line


OUTPUT_SCHEMA = pa.schema([
    ("source", pa.string()), ("source_id", pa.int32()), ("line", pa.int64()),
    ("origin", pa.int64()), ("status", pa.string()), ("reason", pa.string()),
    ("raw", pa.string()), ("format", pa.string()), ("split", pa.string()),
    ("content_hash", pa.string()), ("num_tokens", pa.int32()), ("trained_tokens", pa.int32()),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("rejected_input_ids", pa.list_(pa.int32())), ("rejected_labels", pa.list_(pa.int32())),
    ("desirable", pa.bool_()),  # unpaired records: the label (true for every other format)
])
RAW_KEEP = 2000  # characters of a rejected line kept in the reject report
REASON_KEEP = 500  # characters of a reject reason


@dataclass(frozen=True)
class RecordRules:
    """How records are read, masked and filtered (from the `data` config section)."""

    max_seq_len: int
    eval_fraction: float = 0.0
    trained_roles: tuple[str, ...] = ("assistant",)
    truncation: str = "right"  # or "reject"
    min_tokens: int = 1
    max_tokens: int | None = None
    max_record_bytes: int = 4_000_000
    fmt: str = "auto"  # used where the reader gave no per-file format
    # What the training method trains on: "sequences" (any format), "pairs" (only
    # preference records, both answers trained) or "completions" (unpaired records, or
    # preference records split into their two answers); `method` names it in reject reasons.
    record_kind: str = "sequences"
    method: str = "sft"
    fields: dict[int, dict[str, str]] = field(default_factory=dict)  # per source_id

    @property
    def pairs(self) -> bool:
        return self.record_kind == "pairs"

    @classmethod
    def from_config(cls, cfg, eval_fraction: float,
                    fields: dict[int, dict[str, str]] | None = None,
                    record_kind: str = "sequences") -> RecordRules:
        data = cfg.data
        return cls(max_seq_len=data.max_seq_len, eval_fraction=eval_fraction,
                   trained_roles=tuple(data.train_on_roles), truncation=data.truncation,
                   min_tokens=data.min_tokens, max_tokens=data.max_tokens,
                   max_record_bytes=data.max_record_bytes, fmt=data.format, fields=fields or {},
                   record_kind=record_kind, method=cfg.train.method)


class TokenizeRecords:
    """Ray Data callable class: one tokenizer per actor, loaded once. Every input line
    becomes one output row, accepted (with tokens and labels) or rejected (with a reason):
    whatever a line holds, no exception leaves this class and no row is dropped."""

    def __init__(self, tokenizer_path: str, rules: RecordRules, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        self.rules = rules
        # Past this many tokens a record's outcome is settled (see `render`).
        self.stop_after = max(rules.max_seq_len, rules.max_tokens or 0, rules.min_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # Parse and render every record first, then tokenize all their pieces in one call:
        # the fast tokenizer's batch path is far quicker than one call per record.
        parsed = [self.parse(batch, i) for i in range(len(batch["line"]))]
        texts = [text for _, views in parsed for pieces in views for text, _ in pieces]
        try:
            encoded = iter(self._encode(texts))
        except Exception:  # noqa: BLE001 - a text it refuses: find it record by record below
            encoded = None
        rows = []
        for i, (row, views) in enumerate(parsed):
            if views:
                text = str(batch["text"][i])
                tokens = ([_join(pieces, encoded) for pieces in views] if encoded is not None
                          else self._tokenize_alone(row, views, text))
                if tokens is not None:
                    self.finish(row, tokens, text)
            rows.append(row)
        return _to_table(rows)

    def parse(self, batch: dict[str, np.ndarray], i: int):
        """(row, views): views are the (text, trained) pieces of the record (and of its
        rejected answer for preference pairs); a bad record gets its reason and no views."""
        rules = self.rules
        source_id, line, role = int(batch["source_id"][i]), int(batch["line"][i]), str(batch["role"][i])
        row: dict[str, Any] = {
            "source": str(batch["source"][i]), "source_id": source_id, "line": line,
            "origin": origin_of(role, source_id, line), "status": "accepted", "reason": "",
            "raw": "", "format": "", "split": "eval" if role == "eval" else "",
            "content_hash": "", "num_tokens": 0, "trained_tokens": 0, "input_ids": [],
            "labels": [], "rejected_input_ids": [], "rejected_labels": [], "desirable": True,
            "_cut": [],  # per view: rendering stopped at the token limit (not an output column)
        }
        text = str(batch["text"][i])
        try:
            if batch["error"][i]:  # the file breaks off here (truncated or corrupt)
                raise RecordError(str(batch["error"][i]))
            size = int(batch["num_bytes"][i])
            if size > rules.max_record_bytes:
                raise RecordError(f"record too large: {size} bytes > "
                                  f"data.max_record_bytes={rules.max_record_bytes}")
            if bool(batch["bad_utf8"][i]):
                raise RecordError("line is not valid UTF-8")
            record = parse_line(text)
            fields = rules.fields.get(source_id, {})
            fmt = str(batch["file_format"][i]) or (rules.fmt if rules.fmt != "auto" else "")
            row["format"] = fmt = fmt or detect_format(record, fields) or ""
            if not fmt:
                raise RecordError("no known format: expected a 'text', 'messages', "
                                  "'instruction' + 'output' or 'chosen' + 'rejected' field")
            if rules.pairs and fmt != "preference":
                raise RecordError(f"train.method={rules.method} trains on preference records "
                                  "(prompt, chosen, rejected); this record has no "
                                  "chosen/rejected pair")
            if rules.record_kind == "completions" and fmt not in ("preference", "unpaired"):
                raise RecordError(f"train.method={rules.method} trains on unpaired records "
                                  "(prompt, completion, label) or preference pairs; this "
                                  "record is neither")
            if fmt == "unpaired" and rules.record_kind == "completions":
                one = to_completion(record, fields)
                turns = one.prompt + [one.completion]
                key = content_key(turns + [Turn("label", str(one.desirable), False)])
                rendered = [render(turns, self.tokenizer, self.stop_after)]
                row["desirable"] = one.desirable
            elif fmt == "preference":
                pair = to_preference(record, fields)
                turns = pair.prompt + [pair.chosen]
                key = content_key(turns + [Turn("rejected", pair.rejected.content, True)])
                rendered = [render(turns, self.tokenizer, self.stop_after),
                            render(pair.prompt + [pair.rejected], self.tokenizer, self.stop_after)]
            else:
                turns = to_turns(record, fmt, fields, rules.trained_roles)
                key = content_key(turns)
                rendered = [render(turns, self.tokenizer, self.stop_after)]
            digest, split = split_of(key, rules.eval_fraction)
            row.update(content_hash=digest, split=row["split"] or split,
                       _cut=[cut for _, cut in rendered])
            return row, [pieces for pieces, _ in rendered]
        except RecordError as err:
            self.reject(row, str(err), text)
        except Exception as err:  # noqa: BLE001 - the last guard: a reason, never a crash
            self.reject(row, unexpected(err), text)
        return row, []

    def finish(self, row: dict[str, Any], tokens: list[tuple[list[int], list[int]]],
               text: str) -> None:
        """Applies the length rules to the tokenized views and fills the row."""
        try:
            (ids, labels), *rest = [self._limit(*t, cut=cut) for t, cut in zip(tokens, row["_cut"])]
            trained = int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE))
            if trained == 0:
                raise RecordError(f"no trainable tokens within max_seq_len={self.rules.max_seq_len}")
            both = rest and self.rules.record_kind != "sequences"  # both answers are trained
            if both and not np.count_nonzero(np.asarray(rest[0][1][1:]) != IGNORE):
                raise RecordError("no trainable tokens of the rejected answer within "
                                  f"max_seq_len={self.rules.max_seq_len}")
            row.update(num_tokens=len(ids), trained_tokens=trained, input_ids=ids, labels=labels)
            if rest:
                row.update(rejected_input_ids=rest[0][0], rejected_labels=rest[0][1])
        except RecordError as err:
            self.reject(row, str(err), text)
        except Exception as err:  # noqa: BLE001 - the last guard: a reason, never a crash
            self.reject(row, unexpected(err), text)

    def one(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        """One record on its own (tests and debugging)."""
        row, views = self.parse(batch, i)
        if views:
            text = str(batch["text"][i])
            tokens = self._tokenize_alone(row, views, text)
            if tokens is not None:
                self.finish(row, tokens, text)
        return row

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _tokenize_alone(self, row: dict[str, Any], views, text: str):
        """The record's views tokenized on their own, or None when the tokenizer refuses
        one of its texts (the row is then rejected with the tokenizer's error)."""
        try:
            return [_join(pieces, iter(self._encode([t for t, _ in pieces]))) for pieces in views]
        except Exception as err:  # noqa: BLE001 - tokenizers raise TypeError, ValueError, ...
            self.reject(row, f"cannot tokenize: {type(err).__name__}: {err}", text)
            return None

    @staticmethod
    def reject(row: dict[str, Any], reason: str, text: str) -> None:
        reason = f"{reason} ({row['format']} format)" if row["format"] else reason
        # A reason quotes the record, which may be long or hold lone surrogates that Arrow
        # cannot store.
        reason = reason[:REASON_KEEP].encode("utf-8", "backslashreplace").decode("utf-8")
        row.update(status="rejected", reason=reason, raw=text[:RAW_KEEP], content_hash="",
                   num_tokens=0, trained_tokens=0, input_ids=[], labels=[],
                   rejected_input_ids=[], rejected_labels=[])

    def _limit(self, ids: list[int], labels: list[int], cut: bool = False) -> tuple[list[int], list[int]]:
        """Applies min_tokens / max_tokens / max_seq_len (may raise RecordError). With
        `cut`, the record has more tokens than `ids` (rendering stopped early)."""
        rules = self.rules
        n = len(ids)
        count = f"more than {n}" if cut else str(n)
        if rules.max_tokens is not None and n > rules.max_tokens:
            raise RecordError(f"too long: {count} tokens > data.max_tokens={rules.max_tokens}")
        if n < rules.min_tokens:
            raise RecordError(f"too short: {n} tokens < data.min_tokens={rules.min_tokens}")
        if n > rules.max_seq_len:
            if rules.truncation == "reject":
                raise RecordError(f"too long: {count} tokens > data.max_seq_len="
                                  f"{rules.max_seq_len} (data.truncation=reject)")
            ids, labels = ids[: rules.max_seq_len], labels[: rules.max_seq_len]
        return ids, labels


def unexpected(err: Exception) -> str:
    """The reject reason for an error no rule foresaw: its type and message."""
    return f"unexpected error: {type(err).__name__}: {str(err)[:300]}"


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> Arrow table; token lists go through numpy, much faster than from_pylist."""
    columns = {}
    for name in OUTPUT_SCHEMA.names:
        values = [r[name] for r in rows]
        kind = OUTPUT_SCHEMA.field(name).type
        if pa.types.is_list(kind):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
            offsets = np.zeros(len(values) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            flat = (np.concatenate([np.asarray(v, dtype=np.int32) for v in values]) if len(values)
                    else np.zeros(0, np.int32))
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        else:
            columns[name] = pa.array(values, type=kind)
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def _join(pieces: list[tuple[str, bool]], encoded) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates the next len(pieces) encodings from `encoded`, labelling trained pieces."""
    ids, labels = [], []
    for (_, trained), piece_ids in zip(pieces, encoded):
        piece = np.asarray(piece_ids, dtype=np.int32)
        ids.append(piece)
        labels.append(piece if trained else np.full(len(piece), IGNORE, dtype=np.int32))
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(ids), np.concatenate(labels)
