"""A stub OpenAI-compatible server for the self-chat tests and benchmark (stdlib only, 127.0.0.1, random port).

It answers Chat Completions with a deterministic self-chat reply and can misbehave on demand: latency, a
requests-per-minute limit answered with 429 + Retry-After, scripted 429/500/hang/malformed/401/400 replies.
It counts requests per request key (a hash of the body), and 200 replies per key (`ok_counts`: what was paid for),
so tests can prove nothing was requested, or paid, twice.
It also implements the four Batch API calls the `openai-batch` backend uses (files, batches), the Completions call
(raw prompts), and can answer with any text (`reply`: e.g. a judge's JSON, or a broken one); every request body is
kept in `bodies`.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOPIC = re.compile(r"about the topic: '(.*?)'\. Human statements", re.S)


def body_key(body: dict) -> str:
    fields = {k: body.get(k) for k in ("model", "messages", "temperature", "top_p", "max_tokens", "stop")}
    if body.get("seed") is not None:  # a re-asked turn: the same messages with another sampling seed
        fields["seed"] = body["seed"]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def reply_text(body: dict, human_rounds: int = 2) -> str:
    """The reply a cooperative model would write for a self-chat request."""
    content = body["messages"][-1]["content"]
    m = TOPIC.search(content)
    topic = m.group(1) if m else "it"
    if content.endswith("[Human] "):  # turns mode, human side: ask, then stop asking
        asked = content.count("\n[AI] ") - 1  # minus the template's greeting
        return "" if asked >= human_rounds else f"Question {asked + 1} about {topic}?"
    if content.endswith("How can I help you?"):  # transcript mode: the whole conversation
        return (
            f"[Human] What should I know about {topic}?\n[AI] Here is an overview of {topic}.\n"
            f"[Human] Any tips?\n[AI] Start small and practise.\n[Human] Thanks"
        )
    return f"Answer to: {content[:60]}"


class StubState:
    def __init__(self, latency_s: float, rpm_limit: int | None, script, human_rounds: int, hang_s: float,
                 reply=None):
        self.reply = reply
        self.bodies: list[dict] = []
        self.latency_s = latency_s
        self.rpm_limit = rpm_limit
        self.script = script
        self.human_rounds = human_rounds
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # chat requests per body key (every attempt)
        self.ok_counts: Counter[str] = Counter()  # 200 replies per body key
        self.statuses: Counter[int] = Counter()
        self.auth_headers: set[str] = set()
        self.stopping = threading.Event()
        self.bucket = float(rpm_limit / 60) if rpm_limit else 0.0
        self.bucket_t = time.monotonic()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_release = threading.Event()  # batches stay in_progress until set
        self.batch_creates = 0

    def take_rate_token(self) -> float | None:
        """None when the request may pass; else seconds until it could (the Retry-After)."""
        if not self.rpm_limit:
            return None
        rate = self.rpm_limit / 60
        with self.lock:
            now = time.monotonic()
            self.bucket = min(rate, self.bucket + (now - self.bucket_t) * rate)  # 1 s of burst, like the client
            self.bucket_t = now
            if self.bucket >= 1:
                self.bucket -= 1
                return None
            return (1 - self.bucket) / rate


def _completion(body: dict, text: str, finish: str = "stop") -> dict:
    prompt = sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4 + 1
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "stub"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": len(text) // 4 + 1, "total_tokens": 0},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections
    state: StubState

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, obj, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        with self.state.lock:
            self.state.statuses[status] += 1

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "stub_error", "code": code}}, headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):  # noqa: N802
        st = self.state
        if m := re.fullmatch(r"/v1/batches/([\w-]+)", self.path):
            batch = st.batches.get(m.group(1))
            if batch is None:
                return self._error(404, "no such batch")
            if st.batch_release.is_set() and batch["status"] == "in_progress":
                self._finish_batch(batch)
            return self._send(200, batch)
        if m := re.fullmatch(r"/v1/files/([\w-]+)/content", self.path):
            return self._send(200, None, raw=st.files[m.group(1)])
        return self._error(404, f"no route {self.path}")

    def do_POST(self):  # noqa: N802
        st = self.state
        raw = self._body()
        st.auth_headers.add(self.headers.get("Authorization", ""))
        if self.path == "/v1/files":
            return self._upload(raw)
        if self.path == "/v1/batches":
            req = json.loads(raw)
            with st.lock:
                st.batch_creates += 1
                bid = f"batch_{st.batch_creates}"
            st.batches[bid] = {
                "id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"],
                "completion_window": "24h", "created_at": 0, "status": "in_progress",
                "output_file_id": None, "error_file_id": None,
            }
            return self._send(200, st.batches[bid])
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._error(404, f"no route {self.path}")
        body = json.loads(raw)
        key = body_key({**body, "messages": body.get("messages", body.get("prompt"))})
        with st.lock:
            st.counts[key] += 1
            n = st.counts[key]
            st.bodies.append(body)
        if st.latency_s:
            time.sleep(st.latency_s)
        wait = st.take_rate_token()
        if wait is not None:
            return self._error(
                429, "Rate limit reached", "rate_limit_exceeded",
                {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000) + 1)},
            )
        action = st.script(body, n) if st.script else "ok"
        if action == "429":
            return self._error(429, "Rate limit reached", "rate_limit_exceeded", {"retry-after": "1"})
        if action == "500":
            return self._error(500, "The server had an error")
        if action == "hang":
            st.stopping.wait(st.hang_s)
            return self._send(200, _completion(body, reply_text(body, st.human_rounds)))
        if action == "401":  # like OpenAI, echo (part of) the key: the client must not log it
            auth = self.headers.get("Authorization", "")
            return self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}", "invalid_api_key")
        if action == "400":
            return self._error(400, "Invalid value for 'max_tokens'", "invalid_request_error")
        if action in ("413", "422"):  # one request too large / unprocessable
            return self._error(int(action), f"request refused ({action})", "invalid_request_error")
        if action == "403":
            return self._error(403, "You are not allowed to use this model", "permission_denied")
        if action == "404":
            return self._error(404, f"The model '{body.get('model')}' does not exist", "model_not_found")
        if action == "quota":  # OpenAI's "out of credit": a 429 that no wait will fix
            return self._send(429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                              "code": "insufficient_quota"}})
        if action == "429_long":  # a quota window: "come back in two hours"
            return self._error(429, "Rate limit reached for requests per day", "rate_limit_exceeded",
                               {"retry-after": "7200"})
        if action == "malformed":
            return self._send(200, _completion(body, "I am sorry, I cannot write that conversation."))
        if action == "empty_choices":
            return self._send(200, {**_completion(body, ""), "choices": []})
        with st.lock:
            st.ok_counts[key] += 1
        finish = "length" if action == "length" else "stop"
        text = st.reply(body) if st.reply else reply_text(body, st.human_rounds)
        if self.path == "/v1/completions":
            out = _completion({"messages": [{"content": body["prompt"]}], **body}, text, finish)
            out["object"] = "text_completion"
            out["choices"] = [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
            return self._send(200, out)
        return self._send(200, _completion(body, text, finish))

    def _upload(self, raw: bytes) -> None:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw
        )
        content = next(p.get_content() for p in msg.iter_parts() if p.get_filename())
        fid = f"file-{len(self.state.files) + 1}"
        self.state.files[fid] = content if isinstance(content, bytes) else content.encode()
        self._send(200, {"id": fid, "object": "file", "bytes": len(content), "created_at": 0,
                         "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})

    def _finish_batch(self, batch: dict) -> None:
        st = self.state
        out = []
        for line in st.files[batch["input_file_id"]].decode().splitlines():
            item = json.loads(line)
            body = item["body"]
            with st.lock:
                st.counts[body_key(body)] += 1
                st.ok_counts[body_key(body)] += 1
            out.append(json.dumps({"id": "r", "custom_id": item["custom_id"],
                                   "response": {"status_code": 200, "body": _completion(body, reply_text(body))},
                                   "error": None}))
        fid = f"file-{len(st.files) + 1}"
        st.files[fid] = ("\n".join(out) + "\n").encode()
        batch.update(status="completed", output_file_id=fid)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the benchmark opens dozens of connections at once


class StubServer:
    """`with StubServer(latency_s=0.3, rpm_limit=3000) as stub: ... stub.url ...`"""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        rpm_limit: int | None = None,
        script: Callable[[dict, int], str] | None = None,
        human_rounds: int = 2,
        hang_s: float = 30.0,
        reply: Callable[[dict], str] | None = None,
    ):
        self.state = StubState(latency_s, rpm_limit, script, human_rounds, hang_s, reply)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.stopping.set()
        self.state.batch_release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    @property
    def counts(self) -> Counter[str]:
        return self.state.counts
