"""A webhook for a call that another node carries is processed by that node, reply included.

The node behind the balancer that receives it verifies the signature, finds the call the delivery is
about (the `callId` in the URL, or an event's call id / the carrier's call id), and when another
node owns it sends the whole request there (`cluster.webhook`); the owner runs its webhook pipeline
as if the request had come to it (state, reply document, the carrier's follow-up effects) and answers
the status, body and content type. When the owner is gone, this node takes the call over
(bridge/cluster/handover.py) and processes the delivery itself: a dropped media stream's
re-attach request (Twilio's `<Redirect>` after `<Connect><Stream>`) lands here that way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bridge.cluster.errors import NodeUnreachable, RouteError
from bridge.cluster.forwarded import hook_to_json
from bridge.cluster.handover import Handover
from bridge.cluster.redis_store import RedisStore
from bridge.cluster.router import ClusterRouter
from carriers.base import WebhookReply, WebhookRequest, WebhookVerdict

log = logging.getLogger(__name__)

WEBHOOK_METHOD = "cluster.webhook"
ATTEMPTS = 3

# the request -> (our call id, the carrier's call id) it is about, from this node's view (None: unknown)
CallOf = Callable[[WebhookRequest], tuple[str | None, str | None]]


class WebhookRouting:
    def __init__(self, store: RedisStore, router: ClusterRouter, handover: Handover, call_of: CallOf) -> None:
        self.store = store
        self.router = router
        self.handover = handover
        self._call_of = call_of
        self.forwarded = 0

    async def route(self, hook: WebhookRequest, verdict: WebhookVerdict | None) -> WebhookReply | None:
        """The owner's reply when another node owns the call; None: process the delivery here."""
        call_id, provider_call_id = self._call_of(hook)
        if not call_id and provider_call_id:
            call_id = await self.store.call_id_for(provider_call_id)
        if not call_id:
            return None  # a new call, or one this node already carries
        for _ in range(ATTEMPTS):
            owner = await self.router.owner(call_id)
            if owner is None or owner == self.router.node_id:
                return None
            try:
                result = await self.router.forward(owner, WEBHOOK_METHOD, hook_to_json(hook, verdict))
            except NodeUnreachable as exc:
                log.warning("call %s: %s; taking the call over", call_id, exc.message)
                if await self.handover.take(call_id) is None:
                    owner = await self.router.owner(call_id)
                    if owner is not None and owner != self.router.node_id:
                        continue  # another survivor took it: that node answers
                return None
            except RouteError as exc:
                log.warning("call %s: node %s could not process a webhook: %s", call_id, owner, exc.message)
                return None
            self.forwarded += 1
            return WebhookReply(int(result["status"]), str(result["body"]), str(result["contentType"]))
        return None
