"""The data report: what happened to every input record, per source and per reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SourceCounts:
    path: str
    records_read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0


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

    def balanced(self) -> bool:
        per_file = all(f.records_read == f.accepted + f.rejected + f.duplicates for f in self.files)
        return per_file and self.records_read == self.accepted + self.rejected + self.duplicates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataReport:
        files = [SourceCounts(**f) for f in raw.pop("files")]
        return cls(files=files, **raw)


def reason_kind(reason: str) -> str:
    """Groups 'invalid JSON: Expecting ',' delimiter at column 41' under 'invalid JSON'."""
    return reason.split(":", 1)[0]


def report_from_counts(groups: list[dict[str, Any]], files: list[str]) -> DataReport:
    """Builds the report from (source, status, reason, split) group counts."""
    per_file = {path: SourceCounts(path) for path in files}
    report = DataReport(files=list(per_file.values()))
    reasons: Counter[str] = Counter()
    for g in groups:
        n = int(g["count()"])
        counts = per_file.setdefault(g["source"], SourceCounts(g["source"]))
        counts.records_read += n
        if g["status"] == "accepted":
            counts.accepted += n
            if g["split"] == "eval":
                report.eval_records += n
            else:
                report.train_records += n
                report.train_tokens += int(g["sum(num_tokens)"])
                report.train_trained_tokens += int(g["sum(trained_tokens)"])
        else:
            counts.rejected += n
            reasons[reason_kind(g["reason"])] += n
    report.files = list(per_file.values())
    report.records_read = sum(f.records_read for f in report.files)
    report.accepted = sum(f.accepted for f in report.files)
    report.rejected = sum(f.rejected for f in report.files)
    report.reject_reasons = dict(reasons.most_common())
    return report


def render_report(report: DataReport, console, *, cached: bool = False, rejects_dir=None) -> None:
    """The data report as a console table."""
    from rich.table import Table

    table = Table(title="Data" + (" (tokenized cache reused)" if cached else ""))
    for column in ("source", "read", "accepted", "rejected", "duplicates"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for f in report.files:
        table.add_row(_short(f.path), str(f.records_read), str(f.accepted), str(f.rejected),
                      str(f.duplicates))
    table.add_row("[bold]total", str(report.records_read), str(report.accepted),
                  str(report.rejected), str(report.duplicates))
    console.print(table)
    console.print(f"train {report.train_records} records ({report.train_tokens:,} tokens), "
                  f"eval {report.eval_records} records")
    if report.rejected:
        reasons = "; ".join(f"{n} x {r}" for r, n in report.reject_reasons.items())
        where = f" Details: {rejects_dir}/rejects.jsonl" if rejects_dir else ""
        console.print(f"[yellow]Rejected {report.rejected} records:[/yellow] {reasons}.{where}")


def _short(path: str, keep: int = 60) -> str:
    return path if len(path) <= keep else "..." + path[-keep + 3:]
