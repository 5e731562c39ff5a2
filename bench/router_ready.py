"""Waiting for a started router to classify: it answers Route with UNAVAILABLE until it has learned
its routes (their examples embedded through the model host), which takes seconds after SERVING."""

from __future__ import annotations

import time

import grpc
from mirador.v1 import router_pb2, router_pb2_grpc


def wait_for_routes(router: router_pb2_grpc.RouterStub, timeout_s: float = 180.0) -> None:
    """Returns once `router` classifies a request; raises its error if another status comes back,
    or the last UNAVAILABLE once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            router.Route(router_pb2.RouteRequest(text="warm up"), timeout=30)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
