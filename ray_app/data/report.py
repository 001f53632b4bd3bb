"""The data report: what happened to every input record, per source and per reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SourceCounts:
    path: str
    format: str = ""  # given or detected; "" when nothing in the file matched a format
    weight: float = 1.0
    records_read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    train_records: int = 0
    eval_records: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def balanced(self) -> bool:
        return self.records_read == self.accepted + self.rejected + self.duplicates


@dataclass
class DataReport:
    files: list[SourceCounts]
    records_read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    train_records: int = 0
    eval_records: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    # The sequences the workers train on (packed, with sampling weights applied).
    packing: bool = False
    record_kind: str = "sequences"  # or "pairs" (chosen, rejected), or "completions" (KTO)
    max_seq_len: int = 0
    train_sequences: int = 0
    sequence_tokens: int = 0
    packing_efficiency: float = 0.0  # sequence_tokens / (train_sequences * max_seq_len)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each pass
    warnings: list[str] = field(default_factory=list)  # shown with the report (no chat template)

    def balanced(self) -> bool:
        """records_read == accepted + rejected + duplicates, per source and in total."""
        totals = self.records_read == self.accepted + self.rejected + self.duplicates
        return totals and all(f.balanced() for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataReport:
        raw = dict(raw)
        files = [SourceCounts(**f) for f in raw.pop("files")]
        return cls(files=files, **raw)


def reason_kind(reason: str) -> str:
    """Groups 'invalid JSON: Expecting ',' delimiter at column 41' under 'invalid JSON'."""
    return reason.split(":", 1)[0]


def report_from_counts(groups: list[dict[str, Any]], files: dict[str, SourceCounts]) -> DataReport:
    """Builds the report from (source, status, reason, split, format) group counts; status
    is accepted, rejected or duplicate. `files` lists every shard, also those with no line."""
    per_file = {path: SourceCounts(**asdict(c)) for path, c in files.items()}
    report = DataReport(files=[])
    reasons: Counter[str] = Counter()
    per_file_reasons: dict[str, Counter[str]] = {}
    for g in groups:
        n = int(g["count()"])
        counts = per_file.setdefault(g["source"], SourceCounts(g["source"]))
        counts.records_read += n
        if g["format"] and not counts.format:
            counts.format = g["format"]
        if g["status"] == "duplicate":
            counts.duplicates += n
        elif g["status"] == "accepted":
            counts.accepted += n
            if g["split"] == "eval":
                counts.eval_records += n
            else:
                counts.train_records += n
                report.train_tokens += int(g["sum(num_tokens)"])
                report.train_trained_tokens += int(g["sum(trained_tokens)"])
        else:
            counts.rejected += n
            kind = reason_kind(g["reason"])
            reasons[kind] += n
            per_file_reasons.setdefault(g["source"], Counter())[kind] += n
    for path, found in per_file_reasons.items():
        per_file[path].reject_reasons = dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))
    report.files = list(per_file.values())
    for name in ("records_read", "accepted", "rejected", "duplicates", "train_records",
                 "eval_records"):
        setattr(report, name, sum(getattr(f, name) for f in report.files))
    report.reject_reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return report


def render_report(report: DataReport, console, *, cached: bool = False, rejects_dir=None) -> None:
    """The data report as a console table. Paths and reasons quote the data, so they are
    escaped: a '[/]' in a record must not be read as console markup."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Data" + (" (tokenized cache reused)" if cached else ""))
    for column in ("source", "format", "weight", "read", "accepted", "rejected", "duplicates",
                   "rejected because"):
        table.add_column(column, justify="left" if column in ("source", "format",
                                                              "rejected because") else "right")
    for f in report.files:
        why = escape("; ".join(f"{n} {r}" for r, n in f.reject_reasons.items()))
        table.add_row(escape(_short(f.path)), f.format or "?", f"{f.weight:g}", str(f.records_read),
                      str(f.accepted), str(f.rejected), str(f.duplicates), why)
    table.add_row("[bold]total", "", "", str(report.records_read), str(report.accepted),
                  str(report.rejected), str(report.duplicates), "")
    console.print(table)
    console.print(f"train {report.train_records} records ({report.train_tokens:,} tokens), "
                  f"eval {report.eval_records} records")
    if report.record_kind == "pairs":
        console.print(f"train as {report.train_sequences} (chosen, rejected) pairs of <= "
                      f"{report.max_seq_len} tokens each")
    elif report.record_kind == "completions":
        console.print(f"train as {report.train_sequences} labelled completions of <= "
                      f"{report.max_seq_len} tokens each")
    elif report.train_sequences:
        how = "packed into" if report.packing else "as"
        console.print(f"train {how} {report.train_sequences} sequences of <= {report.max_seq_len} "
                      f"tokens; packing efficiency {report.packing_efficiency:.1%} "
                      "(non-pad share of sequence slots)")
    if report.rejected:
        reasons = escape("; ".join(f"{n} x {r}" for r, n in report.reject_reasons.items()))
        where = escape(f" Details: {rejects_dir}/rejects.jsonl") if rejects_dir else ""
        console.print(f"[yellow]Rejected {report.rejected} records:[/yellow] {reasons}.{where}")
    for warning in report.warnings:
        console.print(f"[yellow]Warning:[/yellow] {escape(warning)}", highlight=False)


def _short(path: str, keep: int = 60) -> str:
    return path if len(path) <= keep else "..." + path[-keep + 3:]
