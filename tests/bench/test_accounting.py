"""The benchmarks' accounting (bench/accounting.py): statuses read from a /metrics scrape, the front's refusals included."""

from __future__ import annotations

from bench.accounting import front_refusals, parse, statuses


def test_the_benchmarks_accounting_counts_the_fronts_refusals() -> None:
    sample = parse(
        'genserve_requests_total{code="OK",model="vae",rpc="Generate"} 10\n'
        'genserve_front_refusals_total{code="RESOURCE_EXHAUSTED",rpc="Generate"} 4\n'
        'genserve_rejections_total{code="RESOURCE_EXHAUSTED",rpc="Generate"} 1\n'
    )
    assert statuses(sample) == {"OK": 10, "RESOURCE_EXHAUSTED": 5}
    assert front_refusals(sample) == 4
