"""The terminal summary of a run: the server, the template (cached or built, how long), the clones, and what
the run left or repaired; from the stats each process reports (``Run.stats``), without pytest."""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy.engine import make_url

from pgshard.server.base import ServerInfo
from pgshard.settings import mask_url


def median(values: list[float]) -> float:
    import statistics  # not at start-up: it imports fractions and decimal

    return statistics.median(values)


def server_line(server: ServerInfo, seconds: float | None, waited: float | None = None) -> str:
    took = f", ready in {seconds:.2f} s" if seconds is not None else ""
    if seconds is not None and waited is not None:  # started beside pytest's imports and collection
        took += f" (waited for {min(waited, seconds):.2f} s of it)"
    return f"server: {server.source}, PostgreSQL {server.version}{took} at {shown_url(server.url)}"


def shown_url(url: str) -> str:
    """The server's URL as the summary shows it: masked, without the passfile (a long percent-encoded path in
    the cache dir, the same on every run)."""
    with contextlib.suppress(Exception):
        parsed = make_url(url)
        if "passfile" in parsed.query:
            url = parsed.difference_update_query(["passfile"]).render_as_string(hide_password=False)
    return mask_url(url)


def checked(template: dict[str, Any], *, when_built: bool) -> str:
    """Which pgshard_check lines ran on this template, how they went, and when (a reused one: at its build)."""
    from datetime import datetime

    checks = [str(c).split(":", 1)[0] for c in template.get("checks") or []]
    if not checks:
        return ""
    failed = len({f.split("'")[1] for f in template.get("findings") or [] if f.startswith("pgshard_check '")})
    verdict = f"{failed} failed (pgshard_check_mode = warn)" if failed else "passed"
    if when_built:
        at = datetime.fromtimestamp(float(template.get("checked_at") or 0)).strftime("%Y-%m-%d %H:%M")
        return f", checks {', '.join(checks)} {verdict} at its build ({at})"
    return f", checks {', '.join(checks)} {verdict} in {float(template.get('check_seconds') or 0):.2f} s"


def summary_lines(server: ServerInfo | None, stats: list[dict[str, Any]], stale: list[str],
                  server_seconds: float | None, commit_tests: int = 0, notes: list[str] | None = None, *,
                  server_waited: float | None = None, verbose: bool = False) -> list[str]:
    """The terminal summary: the run's facts (server, template hit or miss, clone time per worker, db_commit
    clones) on one line, or a line each when ``verbose`` (-v); then what the run left, dropped or noted."""
    lines: list[str] = []  # the facts
    if server is not None:
        lines.append(server_line(server, server_seconds, server_waited))
    elif any("server" in s for s in stats):
        lines.append(next(str(s["server"]) for s in stats if "server" in s))
    templates = [s["template"] for s in stats if "template" in s]
    if templates:
        built = [t for t in templates if t["built"]]
        name = templates[0]["name"]
        if built:
            lines.append(f"template {name}: built in {built[0]['build_seconds']:.2f} s (cache miss)"
                         + checked(built[0], when_built=False))
        else:
            lines.append(f"template {name}: reused (cache hit)" + checked(templates[0], when_built=True))
    clones = [f"{s['worker']} {s['clone_ms']:.0f} ms" for s in sorted(stats, key=lambda s: str(s["worker"]))
              if "clone_ms" in s]
    if clones:
        method = next((str(s["clone_method"]) for s in stats if s.get("clone_method")), "")
        lines.append(f"clone per worker{f' ({method})' if method else ''}: " + ", ".join(clones))
    commits = max(sum(int(s.get("commit_clones", 0)) for s in stats), commit_tests)
    if commits:
        waits = [float(s["commit_wait_ms"]) for s in stats if "commit_wait_ms" in s]
        wait = f"{median(waits):.1f} ms" if waits else "not reported"
        lines.append(f"db_commit clones: {commits}, median wait {wait}")
    if lines and not verbose:
        lines = ["; ".join(lines)]
    if templates:  # pgshard_check_mode = warn: what the failed checks found, on every run until fixed
        lines += (built or templates)[0].get("findings") or []
    stale = [*stale, *(name for s in stats for name in s.get("stale_dropped", []) if name not in stale)]
    if stale:
        lines.append(f"dropped {len(stale)} database(s) left by dead runs: {', '.join(stale)}")
    errors = sorted({str(s["finish_error"]) for s in stats if s.get("finish_error")})
    for error in errors:  # the cause only: a foreign fault's whole line was shown with the failing test
        if error.startswith("the cache dir "):
            lines.append(error)
            continue
        lines.append(f"could not drop this run's clones ({error.removeprefix('pgshard: ').split(' (')[0]}); "
                     "the next run or `pgshard clean` drops them")
    # once, not once per worker; the controller's own too (a repaired server cache)
    lines += dict.fromkeys([*(notes or []), *(note for s in stats for note in s.get("notes", []))])
    foreign = sorted({name for s in stats for name in s.get("foreign", [])})
    if foreign:
        from pgshard.discover import redirect_globs

        lines.append(f"the suite created {len(foreign)} database(s) of its own on pgshard's server, outside its "
                     f"clones (left there, unmarked: `pgshard clean` never drops them): {', '.join(foreign)}; "
                     f"put them on the template's clones with: pgshard_redirect = {' '.join(redirect_globs(foreign))}")
    kept = [url for s in stats for url in s.get("kept", [])]
    if kept:
        lines.append("kept (--pg-keep; drop them with `pgshard clean --kept`): " + ", ".join(kept))
    return lines

