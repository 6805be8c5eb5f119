"""The link emulator measured against its own settings (RTT and throughput within 10%)."""

import pytest

from cfm_runtime import CfmError
from cfm_bench.link import LinkSpec, measure


@pytest.mark.parametrize("delay_ms", [10, 40])
def test_rtt_matches_setting(delay_ms):
    m = measure(LinkSpec(delay_ms=delay_ms), pings=10)
    assert abs(m["rtt_ms"] - 2 * delay_ms) <= 0.1 * 2 * delay_ms + 0.5, m


@pytest.mark.parametrize("rate", [4, 40])
def test_throughput_matches_setting(rate):
    m = measure(LinkSpec(delay_ms=2, rate_mbit=rate), pings=3, bulk_bytes=int(rate * 1e6 / 8 * 0.5))
    assert abs(m["throughput_mbit"] - rate) <= 0.1 * rate, m


def test_loss_costs_a_retransmission_timeout():
    m = measure(LinkSpec(delay_ms=2, loss=0.5, seed=1), pings=20)
    assert m["rtt_ms_p95"] >= 200  # a lost segment waits for TCP's minimum RTO
    assert measure(LinkSpec(delay_ms=2), pings=20)["rtt_ms_p95"] < 50


@pytest.mark.parametrize("bad", [dict(delay_ms=-1), dict(delay_ms=1, jitter_ms=2), dict(rate_mbit=0), dict(loss=1)])
def test_bad_settings(bad):
    with pytest.raises(CfmError):
        LinkSpec(**bad)
