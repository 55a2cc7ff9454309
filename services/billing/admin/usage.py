"""The request log: one row per paid call, written by billing when the call is settled, and the
aggregates the admin API serves from it. A row holds no content, token or key: only the first 8 hex
characters of the key's sha256, the model, provider, token counts, cost, status, latency and attempts.
"""

from __future__ import annotations

import asyncpg

from shared import bus, pricing

KEY_PREFIX = 8  # hex characters of the key hash kept in the log
MAX_HOURS = 8760  # one year, routstr-core's bound on `hours`


_RECORD = (
    "INSERT INTO billing.request_log (request_id, key_prefix, model, provider, prompt_tokens,"
    " completion_tokens, cost_msat, status, source, latency_ms, attempts)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING"
)
# A settled batch in one statement: one array per column (asyncpg's executemany would run it row by row).
_RECORD_MANY = (
    "INSERT INTO billing.request_log (request_id, key_prefix, model, provider, prompt_tokens,"
    " completion_tokens, cost_msat, status, source, latency_ms, attempts)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],"
    " $7::bigint[], $8::int[], $9::text[], $10::int[], $11::int[]) ON CONFLICT DO NOTHING"
)


def _log_row(usage: bus.Usage, cost_msat: int) -> tuple:
    return (
        usage.request_id, usage.key_hash[:KEY_PREFIX], usage.model, usage.provider, usage.prompt_tokens,
        usage.completion_tokens, cost_msat, usage.status, usage.source, usage.latency_ms, usage.attempts,
    )  # fmt: skip


class RequestLog:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def record(self, usage: bus.Usage, cost_msat: int) -> None:
        """Log a settled call once (by request id); a redelivered usage event adds nothing."""
        await self.pool.execute(_RECORD, *_log_row(usage, cost_msat))

    async def record_many(self, settled: list[tuple[bus.Usage, int]]) -> None:
        """`record` for a settled batch of (usage, cost msat), in one statement (quota grant settlement)."""
        if settled:
            rows = [_log_row(usage, cost) for usage, cost in settled]
            await self.pool.execute(_RECORD_MANY, *map(list, zip(*rows, strict=True)))

    async def expire(self, days: int) -> int:
        """Delete rows older than `days` (REQUEST_LOG_RETENTION_DAYS); returns how many."""
        done = await self.pool.execute(
            "DELETE FROM billing.request_log WHERE created_at < now() - make_interval(days => $1)", days
        )
        return int(done.split()[-1])

    async def summary(self, hours: int) -> dict:
        row = await self.pool.fetchrow(
            "SELECT count(*) AS requests, count(*) FILTER (WHERE status >= 400 OR source = 'failed') AS errors,"
            " coalesce(sum(prompt_tokens), 0) AS prompt, coalesce(sum(completion_tokens), 0) AS completion,"
            " coalesce(sum(cost_msat), 0) AS revenue, count(DISTINCT model) AS models,"
            " count(DISTINCT key_prefix) AS keys, coalesce(avg(latency_ms), 0)::float8 AS latency"
            " FROM billing.request_log WHERE created_at > now() - make_interval(hours => $1)",
            hours,
        )  # fmt: skip
        requests, errors = row["requests"], row["errors"]
        return {
            "hours": hours, "total_requests": requests, "successful_requests": requests - errors,
            "failed_requests": errors, "error_rate": round(errors / requests, 4) if requests else 0.0,
            "prompt_tokens": int(row["prompt"]), "completion_tokens": int(row["completion"]),
            "total_tokens": int(row["prompt"] + row["completion"]), **_revenue(int(row["revenue"])),
            "unique_models": row["models"], "unique_keys": row["keys"], "avg_latency_ms": round(row["latency"], 1),
        }  # fmt: skip

    async def hourly(self, hours: int) -> list[dict]:
        rows = await self.pool.fetch(
            "SELECT date_trunc('hour', created_at) AS hour, count(*) AS requests,"
            " count(*) FILTER (WHERE status >= 400 OR source = 'failed') AS errors,"
            " coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens, coalesce(sum(cost_msat), 0) AS revenue"
            " FROM billing.request_log WHERE created_at > now() - make_interval(hours => $1)"
            " GROUP BY 1 ORDER BY 1",
            hours,
        )  # fmt: skip
        return [
            {"hour": r["hour"].isoformat(), "requests": r["requests"], "errors": r["errors"],
             "tokens": int(r["tokens"]), **_revenue(int(r["revenue"]))}
            for r in rows
        ]  # fmt: skip

    async def dashboard(self, hours: int) -> dict:
        return {
            "summary": await self.summary(hours),
            "hourly": await self.hourly(hours),
            "revenue_by_model": (await self.revenue_by_model(hours))["models"][:10],
        }

    async def revenue_by_model(self, hours: int) -> dict:
        rows = await self.pool.fetch(
            "SELECT model, count(*) AS requests, count(*) FILTER (WHERE status >= 400 OR source = 'failed') AS errors,"
            " coalesce(sum(prompt_tokens), 0) AS prompt, coalesce(sum(completion_tokens), 0) AS completion,"
            " coalesce(sum(cost_msat), 0) AS revenue, coalesce(avg(latency_ms), 0)::float8 AS latency"
            " FROM billing.request_log WHERE created_at > now() - make_interval(hours => $1)"
            " GROUP BY model ORDER BY revenue DESC, model",
            hours,
        )  # fmt: skip
        models = [
            {"model": r["model"], "requests": r["requests"], "errors": r["errors"], "prompt_tokens": int(r["prompt"]),
             "completion_tokens": int(r["completion"]), **_revenue(int(r["revenue"])),
             "avg_latency_ms": round(r["latency"], 1)}
            for r in rows
        ]  # fmt: skip
        total = sum(m["revenue_msats"] for m in models)
        return {"hours": hours, "models": models, **{f"total_{k}": v for k, v in _revenue(total).items()}}

    async def error_details(self, hours: int, limit: int) -> dict:
        where = "created_at > now() - make_interval(hours => $1) AND (status >= 400 OR source = 'failed')"
        rows = await self.pool.fetch(
            f"SELECT * FROM billing.request_log WHERE {where} ORDER BY created_at DESC LIMIT $2", hours, limit
        )
        counts = await self.pool.fetch(
            f"SELECT status, count(*) AS n FROM billing.request_log WHERE {where} GROUP BY status ORDER BY status",
            hours,
        )
        return {
            "hours": hours,
            "errors": [_row(r) for r in rows],
            "total": sum(c["n"] for c in counts),
            "by_status": {str(c["status"]): c["n"] for c in counts},
        }

    async def logs(self, filters: dict[str, str | int | None], limit: int, offset: int) -> dict:
        """Rows matching every given filter: request_id, model, status, key (hash prefix), hours."""
        clauses, args = [], []
        for name, sql in (("request_id", "request_id = ${}"), ("model", "model = ${}"), ("status", "status = ${}"),
                          ("key", "key_prefix = left(${}, 8)"),
                          ("hours", "created_at > now() - make_interval(hours => ${})")):  # fmt: skip
            if filters.get(name) not in (None, ""):
                args.append(filters[name])
                clauses.append(sql.format(len(args)))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        total = await self.pool.fetchval(f"SELECT count(*) FROM billing.request_log {where}", *args)
        rows = await self.pool.fetch(
            f"SELECT * FROM billing.request_log {where} ORDER BY created_at DESC"
            f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
            *args, limit, offset,
        )  # fmt: skip
        return {"logs": [_row(r) for r in rows], "total": total}


def _revenue(msat: int) -> dict:
    return {"revenue_msats": msat, "revenue_sats": msat / pricing.MSAT_PER_SAT}


def _row(r: asyncpg.Record) -> dict:
    return {
        "request_id": r["request_id"], "timestamp": r["created_at"].isoformat(), "key_hash_prefix": r["key_prefix"],
        "model": r["model"], "provider": r["provider"], "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"], "cost_msats": r["cost_msat"], "status": r["status"],
        "source": r["source"], "latency_ms": r["latency_ms"], "attempts": r["attempts"],
    }  # fmt: skip
