"""Plain-text and Markdown tables from rows of strings."""
from __future__ import annotations


def text_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; columns in `right` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A GitHub Markdown table; columns in `right` are right-aligned."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(str(c) for c in cells) + " |" for cells in [header, align, *rows])


def fmt_seconds(s: float) -> str:
    return f"{s:.2f}" if s < 10 else f"{s:.1f}" if s < 1000 else f"{s:.0f}"


def fmt_count(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 else f"{n:.3g}"


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f}"


def timed_runs(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn() (warm it up first)."""
    import time

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times

