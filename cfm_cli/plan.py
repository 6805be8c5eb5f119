"""`cfm plan`: measure the link to a center and both sides' speed, and propose a split (or local-only) that keeps
the privacy floor (`--min-edge-layers`), saying what the center could recover at that split (docs/privacy.md)."""

from __future__ import annotations

import json

from cfm_runtime.errors import CfmError

from .common import add_center_args, add_model_args, center_options, load


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="measure the link to a center and propose a split (or local-only)")
    add_model_args(p, bricks=False, sparse=False)
    add_center_args(p, required=True)
    p.add_argument("--json", action="store_true", help="print the plan and measurements as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from cfm_runtime.split.client import CenterClient, CenterFailure  # grpc: imported when a center is used
    from cfm_runtime.speculative import estimate
    from cfm_runtime.split.planner import plan

    center = center_options(args)
    center.check()
    model = load(args)
    client = CenterClient(center.address, center.token, center.tls_ca, center.tls, center.timeout)
    try:
        spec = estimate(args.speculate, model.backend.position_cost)
        p = plan(model, client, center.wire, center.min_edge_layers, spec=spec)
    except CenterFailure as e:
        raise CfmError(f"cannot reach the center at {center.address}: {e}") from None
    finally:
        client.close()
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.describe())
    return 0
