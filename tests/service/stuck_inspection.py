"""A test double for the inspection process (service.inspection.checks): it answers "dataset" at once and
never answers "model", like a parser stuck on a hostile upload."""

from __future__ import annotations

import time

from service.sandbox.child import enter_sandbox


def main() -> None:
    channel, _report = enter_sandbox()
    received = channel.receive()
    if received is None:
        return
    request, _fds = received
    if request["function"] == "model":
        time.sleep(600)
    channel.send({"value": {"answered": request["function"]}})


if __name__ == "__main__":
    main()
