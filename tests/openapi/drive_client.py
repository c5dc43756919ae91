"""Drives rdev-api through a client that openapi-python-client generated from /openapi.json.

Usage: drive_client.py GENERATED_DIR BASE_URL API_KEY
GENERATED_DIR holds the generated package `rdev_client`. Prints one JSON object with what the
calls returned; the Rust test that runs this script checks it.
"""

import json
import sys
import time

sys.path.insert(0, sys.argv[1])
base_url, api_key = sys.argv[2], sys.argv[3]

from rdev_client import AuthenticatedClient  # noqa: E402
from rdev_client.api.audit import list_audit_events  # noqa: E402
from rdev_client.api.commands import (  # noqa: E402
    get_command,
    get_command_output,
    list_commands,
    submit_command,
)
from rdev_client.api.projects import create_project  # noqa: E402
from rdev_client.models import (  # noqa: E402
    AuditPage,
    CommandPage,
    CommandResponse,
    CreateProjectRequest,
    ProjectResponse,
    SubmitCommandRequest,
)

client = AuthenticatedClient(base_url=base_url, token=api_key, raise_on_unexpected_status=True)

project = create_project.sync(
    client=client,
    body=CreateProjectRequest(name="generated-client", workdir="/tmp", executor="local"),
)
assert isinstance(project, ProjectResponse), project

submitted = submit_command.sync(
    project.id,
    client=client,
    body=SubmitCommandRequest(command="echo hello from python; echo oops >&2", priority="high"),
    idempotency_key="generated-client-1",
)
assert isinstance(submitted, CommandResponse), submitted

deadline = time.monotonic() + 60
while True:
    command = get_command.sync(submitted.id, client=client)
    assert isinstance(command, CommandResponse), command
    if command.status not in ("queued", "running"):
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"command {submitted.id} stuck in {command.status}")
    time.sleep(0.05)

both = get_command_output.sync_detailed(submitted.id, client=client)
stdout = get_command_output.sync_detailed(submitted.id, client=client, stream="stdout")
listed = list_commands.sync(client=client, project_id=project.id, status="succeeded", limit=10)
assert isinstance(listed, CommandPage), listed
audit = list_audit_events.sync(
    client=client, action="command.submitted", target_id=str(submitted.id)
)
assert isinstance(audit, AuditPage), audit

print(
    json.dumps(
        {
            "submitted_status": submitted.status,
            "priority": submitted.priority,
            "status": command.status,
            "exit_code": command.exit_code,
            "output": both.content.decode(),
            "stdout": stdout.content.decode(),
            "listed": [str(item.id) for item in listed.items],
            "id": str(submitted.id),
            "audited": [event.target_id for event in audit.items],
        }
    )
)
