"""Hostile clients against a running ``slimline serve`` while ordinary clients stream: benchmarks/results/hostile_server.*.

Starts ``slimline serve`` on the built-in model with its default limits, takes each of 4 prompts'
greedy completion alone, then at once: a 50 MB body (declared, and chunked without a length),
JSON nested 10,000 deep, 200 idle connections from one address, and a client that opens a
stream and never reads it; meanwhile 4 ordinary clients (another loopback address) stream the
same 4 prompts greedily. It records how each hostile client was refused or timed out, whether
the ordinary outputs are identical to the completions alone, and the server's memory.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hostile_server.py
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script

from speculative import free_port, wait_until_up

from slimline.hardware import machine_description
from slimline.models import BUILTIN_MODELS
from slimline.serve.limits import ServerLimits

RESULTS = Path(__file__).parent / "results"
MODEL = "coder"
# Client addresses (all loopback): the server caps connections per address.
ATTACKER, ORDINARY, NON_READER, IDLER = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"
PROMPTS = ["import os\n\ndef ", "class Stack:\n    def __init__(self", "for i in range(", "def parse_args(argv):\n"]
MAX_TOKENS = 64


def start_server(port: int, log: Path) -> subprocess.Popen:
    """``slimline serve`` on the built-in model with the default limits; returns once /health answers."""
    command = [sys.executable, "-m", "slimline.cli", "serve", str(BUILTIN_MODELS["stdlib-coder"])]
    command += ["--port", str(port), "--model-name", MODEL, "--max-active", "8"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process, timeout=180, log=log)
    except SystemExit:
        process.kill()
        raise
    return process


def memory_mb(pid: int) -> dict[str, float]:
    """The server's resident memory now and at its peak (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def client(source: str) -> httpx.Client:
    """An HTTP client whose connections come from the loopback address ``source``."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=120)


def greedy_alone(url: str) -> dict[str, tuple[str, float]]:
    """Each prompt's greedy completion and its seconds, one request at a time, nothing else running."""
    alone = {}
    with client(ORDINARY) as http:
        for prompt in PROMPTS:
            started = time.perf_counter()
            response = http.post(
                f"{url}/v1/completions",
                json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
            )
            alone[prompt] = (response.json()["choices"][0]["text"], time.perf_counter() - started)
    return alone


def stream_greedy(url: str, prompt: str) -> dict:
    """One ordinary streaming client: the streamed text and how long it took."""
    started = time.perf_counter()
    pieces = []
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with client(ORDINARY) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        status = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return {"prompt": prompt, "status": status, "text": "".join(pieces), "seconds": time.perf_counter() - started}


def read_reply(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent back within ``timeout`` s (until it closes), b'' if nothing."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and len(data) > 200:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def big_body(port: int, chunked: bool) -> dict:
    """Send (try to) a 50 MB body; record the status, when it came and how much was sent before it."""
    total, block = 50 * 1024 * 1024, b"x" * 65536
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), source_address=(ATTACKER, 0))
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    sock.sendall(head.encode())
    sent, reply = 0, b""
    try:
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                reply = read_reply(sock, 5)
                break
            if writable:
                chunk = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
                sock.sendall(chunk)
                sent += len(block)
    except OSError as error:  # the server closed the connection while we were still sending
        reply = reply or read_reply(sock, 2) or repr(error).encode()
    sock.close()
    return {
        "case": f"50 MB body ({'chunked, no length' if chunked else 'Content-Length declared'})",
        "outcome": status_line(reply),
        "seconds": round(time.perf_counter() - started, 3),
        "body_bytes_sent_before_refusal": sent,
    }


def status_line(reply: bytes) -> str:
    """``413 ...: message`` from a raw reply."""
    if not reply.startswith(b"HTTP/"):
        return reply.decode("latin-1")[:80] or "closed without a reply"
    status = reply.split(b"\r\n", 1)[0].decode()
    body = reply.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in reply else b""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError):
        message = body.decode("latin-1")[:100]
    return f"{status.split(' ', 1)[1]}: {message}"


HOSTILE_BODIES = {
    "JSON nested 10,000 deep": b'{"model": "coder", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "a prompt of 480,000 characters (the context is 512 tokens)": json.dumps(
        {"model": MODEL, "prompt": "x = 1 " * 80_000}
    ).encode(),
    "invalid UTF-8 in the prompt": b'{"model": "coder", "prompt": "caf\xe9"}',
    "100 stop sequences": json.dumps({"model": MODEL, "prompt": "x", "stop": [str(i) for i in range(100)]}).encode(),
    "max_tokens 10^12": json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**12}).encode(),
}


def hostile_request(url: str, case: str) -> dict:
    """POST one of HOSTILE_BODIES; the status and message it got, and how fast."""
    started = time.perf_counter()
    with client(ATTACKER) as http:
        response = http.post(
            f"{url}/v1/completions", content=HOSTILE_BODIES[case], headers={"Content-Type": "application/json"}
        )
    return {
        "case": case,
        "outcome": f"{response.status_code} {response.reason_phrase}: {response.json()['error']['message']}",
        "seconds": round(time.perf_counter() - started, 3),
    }


def idle_connections(port: int, count: int, results: dict) -> None:
    """Open ``count`` connections from one address and send nothing; record refusals and when the rest closed."""
    started = time.perf_counter()
    socks = [socket.create_connection(("127.0.0.1", port), source_address=(IDLER, 0)) for _ in range(count)]
    refused, closed_at = 0, []
    pending = list(socks)
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(pending, [], [], 1)
        for sock in readable:
            data = b""
            try:
                data = sock.recv(4096)
            except OSError:
                pass
            if data.startswith(b"HTTP/1.1 429"):
                refused += 1
            else:
                closed_at.append(time.perf_counter() - started)
            pending.remove(sock)
            sock.close()
    for sock in pending:
        sock.close()
    results["idle"] = {
        "case": f"{count} idle connections from one address",
        "outcome": f"{refused} refused at once with 429; {len(closed_at)} admitted and closed by the idle timeout "
        f"after {min(closed_at, default=0):.1f}-{max(closed_at, default=0):.1f} s; {len(pending)} still open at 60 s",
        "refused": refused,
        "closed_by_timeout": len(closed_at),
        "still_open": len(pending),
        "seconds": round(max(closed_at, default=0.0), 2),
    }


def never_reads(port: int, url: str, results: dict) -> None:
    """Open a stream and never read it; record when the server finished the request and closed the connection."""
    started = time.perf_counter()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((NON_READER, 0))
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": MODEL, "prompt": "x = ", "max_tokens": 400, "temperature": 0, "stream": True})
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body.encode())
    time.sleep(1.0)
    with client(NON_READER) as http:  # a second connection from the same client, only to ask for /health
        while http.get(f"{url}/health").json()["active"] > 0 and time.perf_counter() - started < 120:
            time.sleep(0.2)
    finished = time.perf_counter() - started
    limits = ServerLimits()
    time.sleep(limits.idle_timeout_s + 2)  # then read: what was buffered, and whether the server closed it
    received, closed = 0, False
    sock.settimeout(5)
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                closed = True
                break
            received += len(chunk)
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    sock.close()
    results["never_reads"] = {
        "case": "a client that opens a stream (max_tokens 400) and never reads it",
        "outcome": f"its request ended in the engine after {finished:.1f} s (the stream fit the socket buffers); "
        f"the connection was {'closed by the server' if closed else 'STILL OPEN'} within the idle timeout "
        f"({limits.idle_timeout_s:g} s) after that; {received:,} bytes sat unread",
        "closed": closed,
        "seconds": round(finished, 2),
    }


def render_markdown(report: dict) -> str:
    """The results as a Markdown page."""
    ordinary = report["ordinary"]
    lines = [
        "# Hostile clients against a running `slimline serve`",
        "",
        f"`benchmarks/hostile_server.py` on {report['machine']}, {report['date']}: `slimline serve` on the built-in "
        "model (`builtin:stdlib-coder`, PyTorch, no draft) with its default limits "
        f"(`{report['limits']}`). All hostile clients ran at once while 4 ordinary clients (another loopback "
        f"address) streamed greedy completions of {MAX_TOKENS} tokens. They share the one engine thread with "
        "each other and with the unread stream's request (5 requests interleaved), so each takes about 5x "
        "its time alone, by design.",
        "",
        "| hostile client | outcome | seconds |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {case['case']} | {case['outcome']} | {case['seconds']} |" for case in report["hostile"]]
    lines += [
        "",
        "| ordinary streaming client | status | identical to its greedy completion alone | seconds | alone, s |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    lines += [
        f"| `{row['prompt']!r}` | {row['status']} | {'yes' if row['identical'] else '**no**'} | "
        f"{row['seconds']:.1f} | {row['alone_seconds']:.1f} |"
        for row in ordinary
    ]
    memory = report["memory_mb"]
    lines += [
        "",
        f"All 4 identical: **{all(row['identical'] for row in ordinary)}**. Server memory: resident "
        f"{memory['before']['VmRSS']} MB before, {memory['after']['VmRSS']} MB after, peak {memory['after']['VmHWM']} MB "
        "(the 50 MB bodies were never buffered). The server answered `/health` throughout and afterwards: "
        f"{report['health_after']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the scenario and write the results."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    RESULTS.mkdir(exist_ok=True)
    log = Path(tempfile.gettempdir()) / "slimline-hostile-server.log"
    print(f"server log: {log}")
    server = start_server(port, log)
    try:
        before = memory_mb(server.pid)
        alone = greedy_alone(url)
        background: dict = {}
        threads = [
            threading.Thread(target=idle_connections, args=(port, 200, background)),
            threading.Thread(target=never_reads, args=(port, url, background)),
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the idle sockets are open and the unread stream is decoding
        with ThreadPoolExecutor(max_workers=8) as pool:
            ordinary = [pool.submit(stream_greedy, url, prompt) for prompt in PROMPTS]
            hostile = [
                pool.submit(big_body, port, False),
                pool.submit(big_body, port, True),
                *(pool.submit(hostile_request, url, case) for case in HOSTILE_BODIES),
            ]
            ordinary_rows = [future.result() for future in ordinary]
            hostile_rows = [future.result() for future in hostile]
        for thread in threads:
            thread.join()
        health = httpx.get(f"{url}/health", timeout=10).json()
        report = {
            "machine": machine_description(),
            "date": time.strftime("%Y-%m-%d"),
            "limits": ", ".join(f"{k}={v}" for k, v in ServerLimits().model_dump().items()),
            "hostile": [*hostile_rows, background["idle"], background["never_reads"]],
            "ordinary": [
                {**row, "identical": row["text"] == alone[row["prompt"]][0], "alone_seconds": alone[row["prompt"]][1]}
                for row in ordinary_rows
            ],
            "memory_mb": {"before": before, "after": memory_mb(server.pid)},
            "health_after": health,
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
    (RESULTS / "hostile_server.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "hostile_server.md").write_text(render_markdown(report))
    print(render_markdown(report))
    if not all(row["identical"] and row["status"] == 200 for row in report["ordinary"]):
        raise SystemExit("an ordinary client's output differed or failed")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
