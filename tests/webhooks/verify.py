"""Verifies rdev-api webhook signatures with the `standardwebhooks` package (PyPI), an
implementation not written here. Reads {"secret", "requests": [{"id", "timestamp",
"signature", "body"}]} from the file named by argv[1]; prints {"verified": n, "tampered_refused":
n} and exits non-zero on the first request that does not verify."""

import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

spec = json.load(open(sys.argv[1]))
hook = Webhook(spec["secret"])
verified = refused = 0
for request in spec["requests"]:
    headers = {
        "webhook-id": request["id"],
        "webhook-timestamp": request["timestamp"],
        "webhook-signature": request["signature"],
    }
    payload = hook.verify(request["body"], headers)
    assert payload["type"], payload
    verified += 1
    try:
        hook.verify(request["body"] + " ", headers)
    except WebhookVerificationError:
        refused += 1
print(json.dumps({"verified": verified, "tampered_refused": refused}))
