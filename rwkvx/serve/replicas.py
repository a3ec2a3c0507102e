"""--replicas N: the same app as N Ray Serve replicas behind Ray Serve's HTTP proxy.

Each replica is a whole server of its own (model, engine, state cache) built in its Ray
actor; the proxy spreads requests over them. On one machine this starts a local Ray; with
``ray start --head`` on one machine and ``ray start --address=HEAD:6379`` on the others,
the same command run on the head uses them all. Needs ``pip install ".[ray]"``.
"""
from __future__ import annotations

import os
import signal
import threading

from rwkvx._cli import EXIT_OK, log
from rwkvx.errors import RwkvxError


def _replica_app(args, name):
    """Built inside each replica: the ASGI app, answering with the replica's name."""
    from ray import serve

    from rwkvx.serve.__main__ import make_app
    context = serve.get_replica_context()
    replica_id = getattr(context, "replica_id", None)
    os.environ["RWKVX_REPLICA"] = str(getattr(replica_id, "unique_id", None) or getattr(context, "replica_tag", "r"))
    return make_app(args, name)


def serve_replicas(args, name: str) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RwkvxError("--replicas needs Ray Serve: pip install \"rwkvx[ray]\" "
                         "(or pip install \".[ray]\" from the source tree)") from None
    threads = args.threads or 1
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port}, detached=False)

    @serve.deployment(name="rwkvx", num_replicas=args.replicas, ray_actor_options={"num_cpus": threads},
                      max_ongoing_requests=args.max_batch + args.max_queue)
    @serve.ingress(lambda: _replica_app(args, name))
    class Replica:
        pass

    serve.run(Replica.bind(), name="rwkvx", route_prefix="/", blocking=False)
    log(f"serving {name} on http://{args.host}:{args.port} with {args.replicas} Ray Serve replicas")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return EXIT_OK
