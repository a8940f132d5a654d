"""A verified webhook request as JSON, to be processed by the node that carries its call (no redis import)."""

from __future__ import annotations

import base64
from typing import Any

from carriers.base import WebhookRequest, WebhookVerdict


def hook_to_json(hook: WebhookRequest, verdict: WebhookVerdict | None) -> dict[str, Any]:
    return {"method": hook.method, "path": hook.path, "publicUrl": hook.public_url, "headers": dict(hook.headers),
            "body": base64.b64encode(hook.body).decode(), "query": hook.query, "form": hook.form,
            "remote": hook.remote, "urlVariants": hook.url_variants,
            "verified": verdict is not None, "replayKey": verdict.replay_key if verdict is not None else None}


def hook_from_json(data: dict[str, Any]) -> tuple[WebhookRequest, WebhookVerdict | None]:
    hook = WebhookRequest(method=str(data["method"]), path=str(data["path"]), public_url=str(data["publicUrl"]),
                          headers={str(k): str(v) for k, v in dict(data["headers"]).items()},
                          body=base64.b64decode(data["body"]),
                          query=[(str(k), str(v)) for k, v in data["query"]],
                          form=[(str(k), str(v)) for k, v in data["form"]],
                          remote=str(data.get("remote") or ""), url_variants=[str(u) for u in data["urlVariants"]])
    verdict = WebhookVerdict(ok=True, replay_key=data.get("replayKey")) if data.get("verified") else None
    return hook, verdict
