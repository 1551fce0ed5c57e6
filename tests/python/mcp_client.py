"""Drives `crabboxctl mcp` over stdio with the official MCP Python SDK (not ours).

Usage: mcp_client.py CRABBOXCTL SOCKET LEASE RUN_ID

Initializes, lists the tools, keeps LEASE, runs commands on it with `exec`,
reads run RUN_ID's output from a cursor to its end, waits for it, asks for
the egress status and the task table, and sends calls with bad arguments.
Prints one JSON object with what each step returned; the Rust test
(tests/tests/mcp.rs) asserts on it. Exits non-zero only when the protocol
itself fails (the server crashed or broke the session).
"""

import asyncio
import json
import os
import sys
import tempfile

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


def texts(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def call(session, name, args):
    r = await session.call_tool(name, args)
    text = texts(r)
    out = {"is_error": bool(r.is_error), "text": text, "bytes": len(text.encode())}
    if not r.is_error:
        out["json"] = json.loads(text)
    return out


async def main():
    ctl, socket, lease, run_id = sys.argv[1:5]
    params = StdioServerParameters(
        command=ctl,
        args=["--socket", socket, "mcp"],
        env={k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "XDG_RUNTIME_DIR")},
    )
    report = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            report["server"] = {"name": init.server_info.name, "version": init.server_info.version}
            tools = await session.list_tools()
            report["tools"] = {
                t.name: {
                    "description": t.description,
                    "schema": t.input_schema,
                    "read_only": t.annotations.read_only_hint if t.annotations else None,
                    "destructive": t.annotations.destructive_hint if t.annotations else None,
                }
                for t in tools.tools
            }

            report["keep"] = await call(session, "lease_keep", {"lease_id": lease})
            report["leases"] = await call(session, "lease_list", {})
            report["exec"] = await call(
                session,
                "exec",
                {"lease_id": lease, "command": ["sh", "-c", "echo out; echo err >&2; exit 7"]},
            )
            report["exec_stdin"] = await call(
                session, "exec", {"lease_id": lease, "command": ["wc", "-c"], "stdin": "hello"}
            )
            # 1 MiB of output: the result stays bounded and says what it left out.
            report["exec_big"] = await call(
                session,
                "exec",
                {"lease_id": lease, "command": ["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x; echo END"]},
            )
            report["exec_timeout"] = await call(
                session, "exec", {"lease_id": lease, "command": ["sleep", "30"], "timeout_seconds": 1}
            )

            # A file to the lease and back.
            with tempfile.TemporaryDirectory() as work:
                src = os.path.join(work, "src.txt")
                with open(src, "w") as f:
                    f.write("crab\n" * 1000)
                remote = os.path.join(work, "on-lease.txt")
                back = os.path.join(work, "back.txt")
                report["copy_to"] = await call(
                    session, "copy_to_lease", {"lease_id": lease, "local_path": src, "remote_path": remote}
                )
                report["copy_from"] = await call(
                    session, "copy_from_lease", {"lease_id": lease, "local_path": back, "remote_path": remote}
                )
                report["copy_same"] = os.path.exists(back) and open(back).read() == open(src).read()

            # The run's output from a cursor, page by page, to its end.
            pages = []
            cursor = 0
            for _ in range(200):
                page = await call(session, "run_output", {"run_id": run_id, "cursor": cursor, "wait_seconds": 10})
                pages.append(page)
                if page["is_error"]:
                    break
                cursor = page["json"]["next_cursor"]
                if page["json"]["end"] is not None:
                    break
            report["run_pages"] = pages
            report["run_wait"] = await call(session, "run_wait", {"run_id": run_id, "timeout_seconds": 30})

            # A run started here, on the lease: its output from a cursor to the end.
            started = await call(
                session,
                "run_start",
                {
                    "lease_id": lease,
                    "command": ["sh", "-c", "echo start; echo oops >&2; for i in 1 2 3; do echo line $i; done; exit 3"],
                    "label": "mcp-test",
                },
            )
            report["run_start"] = started
            if not started["is_error"]:
                own = started["json"]["run_id"]
                own_pages = []
                cursor = 0
                for _ in range(100):
                    page = await call(session, "run_output", {"run_id": own, "cursor": cursor, "wait_seconds": 10})
                    own_pages.append(page)
                    if page["is_error"]:
                        break
                    cursor = page["json"]["next_cursor"]
                    if page["json"]["end"] is not None:
                        break
                report["own_pages"] = own_pages
                report["own_wait"] = await call(session, "run_wait", {"run_id": own, "timeout_seconds": 30})
                report["run_list"] = await call(session, "run_list", {})
            # A long run, stopped.
            long = await call(session, "run_start", {"lease_id": lease, "command": ["sleep", "300"]})
            report["long_start"] = long
            if not long["is_error"]:
                report["run_stop"] = await call(session, "run_stop", {"run_id": long["json"]["run_id"]})
                report["long_wait"] = await call(
                    session, "run_wait", {"run_id": long["json"]["run_id"], "timeout_seconds": 60}
                )

            report["egress_status"] = await call(session, "egress_status", {"lease_id": lease})
            report["egress_start_no_allowlist"] = await call(session, "egress_start", {"lease_id": lease})
            report["egress_stop_nothing"] = await call(session, "egress_stop", {"lease_id": lease})
            report["tasks"] = await call(session, "tasks_list", {})
            report["tasks_kind"] = await call(session, "tasks_list", {"kind": "lease-keeper"})
            report["heartbeat"] = await call(session, "lease_heartbeat", {"lease_id": lease})
            report["egress_list"] = await call(session, "egress_list", {})

            # Bad arguments: tool errors, and the session goes on.
            report["bad_missing"] = await call(session, "exec", {"command": ["true"]})
            report["bad_type"] = await call(session, "exec", {"lease_id": lease, "command": "true"})
            report["bad_unknown_field"] = await call(session, "lease_keep", {"lease_id": lease, "bogus": 1})
            report["bad_kind"] = await call(session, "tasks_list", {"kind": "nope"})
            report["bad_cursor"] = await call(session, "lease_list", {"cursor": "zzz"})
            report["unknown_lease"] = await call(session, "lease_keep", {"lease_id": "cbx_0000000dead0"})
            report["after_errors"] = await call(session, "lease_list", {})
            # Last: release the lease; the daemon stops keeping it.
            report["release"] = await call(session, "lease_release", {"lease_id": lease})
            report["leases_after_release"] = await call(session, "lease_list", {})
    print(json.dumps(report))


asyncio.run(main())
