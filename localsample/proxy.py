"""`serve`: an MCP server for the host that forwards to downstream servers.

The host (Claude Desktop, Cursor, ...) talks to this server over stdio (or Streamable HTTP
with ``--listen``) exactly as it would talk to the downstream server itself: tools,
resources, prompts, completions and logging pass through, as do progress and
cancellation of forwarded calls and list-changed / resource-updated notifications.
Elicitation and roots requests from a downstream server go to the host. Sampling requests
never reach the host: localsample answers them with a local model.

With several servers, a tool or prompt name offered by more than one of them is exposed
as ``SERVER__NAME`` for each of them; unique names pass through unchanged. Resources are
routed by URI to the server that listed them (a URI not listed goes to each server in
turn until one can read it).

Downstream servers are connected concurrently, each within ``connect_timeout``. One that
fails to connect is left out with one log line, and the host is served by the others
(``serve`` fails only when none connects). One that goes away later is dropped from the
lists the host gets, and the host is told that its lists changed. SIGTERM or SIGINT
cancels everything in flight (generation included) and ``serve`` returns, so that the
caller's cleanup runs.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
from mcp import Client, types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.session import ServerSession
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from localsample import __version__
from localsample.approval import ElicitationApprover
from localsample.client import ServerSpec, connect_error, first_cause, make_client, mcp_error_kind
from localsample.downstream import Downstream, all_pages, exposed_names, headline, merged
from localsample.errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    ServerError,
    ServerSpecError,
)
from localsample.host_relay import HostRelay
from localsample.listen import host_lines, serve_app
from localsample.runtime import Runtime
from localsample.sampling import SamplingHandler

log = logging.getLogger(__name__)

REAP_INTERVAL = 5.0
"""Seconds between checks for idle models whose keep-alive has run out."""
CONNECT_GRACE = 2.0
"""Seconds past ``connect_timeout`` after which a connection attempt is abandoned here,
should the client's own timeout not have ended it."""
NOTIFY_TIMEOUT = 5.0
"""Seconds a notification to the host may wait for the host's stream."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Ctx = ServerRequestContext[Any, Any]
T = TypeVar("T")


class Proxy:
    """The upstream server; ``run_stdio`` / ``run_http`` serve it until the host leaves,
    or until SIGTERM or SIGINT (``stopped_by`` then says which)."""

    def __init__(self, runtime: Runtime, specs: Sequence[ServerSpec], *, connect_timeout: float | None = None) -> None:
        """``connect_timeout``: seconds each downstream server has to connect (default: the
        ``connect_timeout`` setting)."""
        if not specs:
            raise ServerSpecError("serve needs at least one --server", 'add --server "python my_server.py"')
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ServerSpecError(
                f"two --server values share the name {', '.join(duplicates)}",
                "name each one: --server NAME=COMMAND",
            )
        self.runtime = runtime
        self.connect_timeout = runtime.settings.connect_timeout if connect_timeout is None else connect_timeout
        self.downstreams = [Downstream(spec) for spec in specs]
        self.host: ServerSession | None = None
        self.relay = HostRelay(lambda: self.host)
        self.stopped_by: signal.Signals | None = None
        self.tools: dict[str, tuple[Downstream, str]] = {}
        self.prompts: dict[str, tuple[Downstream, str]] = {}
        self.resources: dict[str, Downstream] = {}
        self.server: Server[Any] = Server(
            "localsample",
            version=__version__,
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
            on_subscribe_resource=self.subscribe,
            on_unsubscribe_resource=self.unsubscribe,
            on_list_prompts=self.list_prompts,
            on_get_prompt=self.get_prompt,
            on_completion=self.complete,
            on_set_logging_level=self.set_logging_level,
        )

    @property
    def exit_status(self) -> int:
        """What the process should exit with: 130 (128 + SIGINT) after an interrupt, as
        shells report one; else 0 (SIGTERM asks for a clean stop, and got one)."""
        return 128 + signal.SIGINT if self.stopped_by == signal.SIGINT else 0

    # -- downstream connections ----------------------------------------------------------

    async def _hold(self, down: Downstream) -> None:
        """Connect to one downstream server and keep the connection until it ends.

        Connecting is bounded (``connect_timeout``); a failure to connect is recorded in
        ``down.failure``, never raised, so that it cannot stop the other servers. A
        connection lost later is reported once (``_lost``).
        """
        sampling = SamplingHandler(self.runtime, server=down.name, ask=ElicitationApprover(lambda: self.host))
        client = make_client(
            down.spec,
            sampling,
            elicitation=self.relay.elicit,
            list_roots=self.relay.list_roots,
            logging_callback=self.relay.forward_log,
            message_handler=self.relay.notification_handler(down.name),
            connect_timeout=self.connect_timeout,
        )
        try:
            await self._connection(down, client)
        finally:
            if down.failure is not None:
                down.end(headline(down.failure.problem))
            down.client = None
            down.settled.set()

    async def _connection(self, down: Downstream, client: Client) -> None:
        # The client bounds its own connect; this deadline is a backstop for the case it does not.
        with anyio.CancelScope(deadline=anyio.current_time() + self.connect_timeout + CONNECT_GRACE) as connecting:
            try:
                async with client:
                    connecting.deadline = math.inf
                    down.connected(client)
                    log.info(
                        "connected to %s (%s, protocol %s)", down.name, down.spec.describe(), client.protocol_version
                    )
                    await down.stop.wait()
            except Exception as exc:
                error = connect_error(down.spec, first_cause(exc))
                if down.client is None:
                    down.failure = error
                else:
                    await self._lost(down, headline(error.problem))
        if connecting.cancelled_caught and down.client is None:
            down.failure = ServerError(
                f"server '{down.name}' ({down.spec.describe()}) did not finish connecting within "
                f"{self.connect_timeout:g} s",
                "run the server command by itself to check that it starts and talks MCP on stdio",
            )

    async def _lost(self, down: Downstream, reason: str) -> None:
        """A connected server went away: stop using it, say so once, and tell the host
        that the lists the server contributed to have changed."""
        if not down.end(reason):
            return
        log.error("downstream server '%s' is gone: %s", down.name, reason)
        host = self.host
        if host is None:
            return
        changes = {
            "tools": host.send_tool_list_changed,
            "prompts": host.send_prompt_list_changed,
            "resources": host.send_resource_list_changed,
        }
        for capability, send in changes.items():
            if down.offers(capability):
                try:
                    with anyio.fail_after(NOTIFY_TIMEOUT):
                        await send()
                except Exception as exc:
                    log.debug("%s list_changed not sent to the host: %s", capability, exc)

    async def _connect_all(self) -> None:
        """Wait until each downstream server has connected or failed to (each attempt is
        bounded); log one line per failure; fail only if none connected."""
        for down in self.downstreams:
            await down.settled.wait()
        failures = [d.failure for d in self.downstreams if d.failure is not None]
        if len(failures) == len(self.downstreams):
            if len(failures) == 1:
                raise failures[0]
            raise ServerError(
                "no downstream server could be started: " + "; ".join(f.problem for f in failures),
                "run each server command by itself to see its own error output",
            )
        for failure in failures:
            fix = f" (fix: {failure.fix})" if failure.fix else ""
            log.error("%s; serving the other servers without it%s", headline(failure.problem), fix)

    async def serve(self, run_host: Callable[[], Awaitable[None]]) -> None:
        """Preload models, connect the downstream servers, serve the host, then stop.

        Returns when the host leaves, or on SIGTERM / SIGINT: then every task is cancelled
        (generation stops, requests in flight are cancelled and audited as such, the
        downstream servers are closed) before this returns.
        """
        self.runtime.publishing = True
        background = anyio.CancelScope()  # preload, keep-alive, signals: stopped when the host leaves

        async with anyio.create_task_group() as group:
            group.start_soon(self._background, background, group.cancel_scope)
            for down in self.downstreams:
                group.start_soon(self._hold, down)
            try:
                await self._connect_all()
                if len(self.downstreams) == 1 and self.downstreams[0].client is not None:
                    self.server.instructions = self.downstreams[0].client.instructions
                await run_host()
            finally:
                for down in self.downstreams:
                    down.end("localsample serve is stopping")
                background.cancel()

    async def _background(self, scope: anyio.CancelScope, everything: anyio.CancelScope) -> None:
        with scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._preload)
                tasks.start_soon(self._reap_forever)
                tasks.start_soon(self._stop_on_signal, everything)

    async def _stop_on_signal(self, everything: anyio.CancelScope) -> None:
        """On SIGTERM or SIGINT, cancel ``everything`` (a second signal, during the
        cleanup, gets the default behaviour)."""
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for received in signals:
                self.stopped_by = received
                log.info("%s received: cancelling requests in flight and stopping", received.name)
                everything.cancel()
                return

    async def _preload(self) -> None:
        try:
            await self.runtime.preload()
        except Exception as exc:  # a model that fails to load must not stop the proxy
            log.error("preloading failed: %s", exc)

    async def _reap_forever(self) -> None:
        while True:
            await anyio.sleep(REAP_INTERVAL)
            self.runtime.reap()

    def init_options(self) -> Any:
        changes = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        return self.server.create_initialization_options(changes)

    async def run_stdio(self) -> None:
        from mcp.server.stdio import stdio_server

        async def host() -> None:
            # stdio_server only iterates over stdin's lines; see host_lines for why not its own reader.
            stdin = cast("anyio.AsyncFile[str]", host_lines())
            async with stdio_server(stdin=stdin) as (read, write):
                await self.server.run(read, write, self.init_options())

        await self.serve(host)

    async def run_http(
        self,
        host: str,
        port: int,
        *,
        token: str | None = None,
        allow_remote: bool = False,
        extra_hosts: Sequence[str] = (),
    ) -> None:
        """Serve the host over Streamable HTTP at ``/mcp``, behind listen.py's checks (bind
        address, bearer token, Host and Origin on every request)."""
        # listen.Guard checks Host and Origin on every bind; the SDK's own check (loopback
        # binds only) would refuse the --allow-host names, so it is off.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        app = self.server.streamable_http_app(transport_security=security)
        await self.serve(
            lambda: serve_app(app, host, port, token=token, allow_remote=allow_remote, extra_hosts=extra_hosts)
        )

    # -- calls from the host -------------------------------------------------------------

    def _seen(self, ctx: Ctx) -> None:
        self.host = ctx.session

    async def _forward(self, down: Downstream, call: Callable[[Client], Awaitable[T]]) -> T:
        """Run one forwarded request; a dead downstream becomes a clear error, not a hang
        (and the first such error drops the server, see ``_lost``)."""
        client = down.require()
        try:
            return await call(client)
        except MCPError as exc:
            if mcp_error_kind(exc) != "closed":
                raise
            cause: BaseException = exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            cause = exc
        await self._lost(down, "it closed the connection")
        raise MCPError(
            INTERNAL_ERROR,
            f"downstream server '{down.name}' closed the connection (it exited or crashed; its own "
            "output is in localsample's stderr); fix: restart this MCP server in the host to reconnect",
        ) from cause

    async def _pages(self, down: Downstream, method: str, items: str) -> list[Any]:
        """Every page of one list method (``list_tools``, ...) of one downstream server."""
        return await self._forward(down, lambda c: all_pages(lambda cursor: getattr(c, method)(cursor=cursor), items))

    def _live(self) -> list[Downstream]:
        return [d for d in self.downstreams if d.alive]

    async def _gather(self, capability: str, method: str, items: str) -> list[tuple[Downstream, Any]]:
        """One list method's items from every live server that declares ``capability``.

        A server that fails is left out (a server that went away is dropped for good);
        its error reaches the host only when no server answered.
        """
        listed: list[tuple[Downstream, Any]] = []
        errors: list[MCPError] = []
        answered = False
        for down in self._live():
            if not down.offers(capability):
                continue
            try:
                found = await self._pages(down, method, items)
            except MCPError as exc:
                if down.alive:  # (a server that went away has had its log line)
                    log.warning("%s: %s failed: %s", down.name, method, exc)
                errors.append(exc)
                continue
            answered = True
            listed.extend((down, item) for item in found)
        if errors and not answered:
            raise errors[0]
        return listed

    async def _named(self, kind: str) -> dict[str, tuple[Downstream, Any]]:
        """Tools or prompts of every server, colliding names prefixed with the server name."""
        listed = await self._gather(kind, f"list_{kind}", kind)
        names = exposed_names([(down.name, item.name) for down, item in listed])
        return dict(zip(names, listed, strict=True))

    async def list_tools(self, ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        self._seen(ctx)
        exposed = await self._named("tools")
        self.tools = merged(self.tools, {name: (down, tool.name) for name, (down, tool) in exposed.items()})
        return types.ListToolsResult(tools=[tool.model_copy(update={"name": n}) for n, (_, tool) in exposed.items()])

    async def call_tool(self, ctx: Ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        self._seen(ctx)
        if params.name not in self.tools:
            await self.list_tools(ctx, None)
        route = self.tools.get(params.name)
        if route is None:
            raise MCPError(INVALID_PARAMS, f"unknown tool '{params.name}' (known: {', '.join(self.tools)})")
        down, original = route
        token = ctx.meta.get("progress_token") if ctx.meta else None

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            if token is not None:
                await ctx.session.send_progress_notification(token, progress, total, message)

        return await self._forward(
            down,
            lambda c: c.call_tool(original, params.arguments, progress_callback=relay if token is not None else None),
        )

    async def list_prompts(self, ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        self._seen(ctx)
        exposed = await self._named("prompts")
        self.prompts = merged(self.prompts, {name: (down, prompt.name) for name, (down, prompt) in exposed.items()})
        return types.ListPromptsResult(
            prompts=[prompt.model_copy(update={"name": n}) for n, (_, prompt) in exposed.items()]
        )

    async def get_prompt(self, ctx: Ctx, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        self._seen(ctx)
        if params.name not in self.prompts:
            await self.list_prompts(ctx, None)
        route = self.prompts.get(params.name)
        if route is None:
            raise MCPError(INVALID_PARAMS, f"unknown prompt '{params.name}' (known: {', '.join(self.prompts)})")
        down, original = route
        return await self._forward(down, lambda c: c.get_prompt(original, params.arguments))

    async def list_resources(self, ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        self._seen(ctx)
        found: list[types.Resource] = []
        for down, resource in await self._gather("resources", "list_resources", "resources"):
            uri = str(resource.uri)
            owner = self.resources.get(uri)
            if owner is None or not owner.alive:
                self.resources[uri] = down
            found.append(resource)
        return types.ListResourcesResult(resources=found)

    async def list_resource_templates(
        self, ctx: Ctx, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        self._seen(ctx)
        listed = await self._gather("resources", "list_resource_templates", "resource_templates")
        return types.ListResourceTemplatesResult(resource_templates=[template for _, template in listed])

    async def read_resource(self, ctx: Ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        self._seen(ctx)
        uri = str(params.uri)
        last: MCPError | None = None
        for down in self._owners(uri):
            try:
                return await self._forward(down, lambda c: c.read_resource(uri))
            except MCPError as exc:
                last = exc
        raise last or MCPError(INVALID_PARAMS, f"no downstream server has resource {uri}")

    async def subscribe(self, ctx: Ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
        self._seen(ctx)
        for down in self._owners(str(params.uri)):
            await self._forward(down, lambda c: c.subscribe_resource(str(params.uri)))
        return types.EmptyResult()

    async def unsubscribe(self, ctx: Ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        self._seen(ctx)
        for down in self._owners(str(params.uri)):
            await self._forward(down, lambda c: c.unsubscribe_resource(str(params.uri)))
        return types.EmptyResult()

    def _owners(self, uri: str) -> list[Downstream]:
        """The server that listed ``uri``; else (or once it is gone) every live server."""
        owner = self.resources.get(uri)
        live = self._live()
        return [owner] if owner is not None and (owner.alive or not live) else live

    async def complete(self, ctx: Ctx, params: types.CompleteRequestParams) -> types.CompleteResult:
        self._seen(ctx)
        ref = params.ref
        argument = {"name": params.argument.name, "value": params.argument.value}
        context = params.context.arguments if params.context else None
        if isinstance(ref, types.PromptReference):
            route = self.prompts.get(ref.name)
            if route is None:
                await self.list_prompts(ctx, None)
                route = self.prompts.get(ref.name)
            if route is None:
                raise MCPError(INVALID_PARAMS, f"unknown prompt '{ref.name}'")
            down, original = route
            forwarded = ref.model_copy(update={"name": original})
            return await self._forward(down, lambda c: c.complete(forwarded, argument, context))
        for down in self._live():
            try:
                return await self._forward(down, lambda c: c.complete(ref, argument, context))
            except MCPError:
                continue
        return types.CompleteResult(completion=types.Completion(values=[]))

    async def set_logging_level(self, ctx: Ctx, params: types.SetLevelRequestParams) -> types.EmptyResult:
        self._seen(ctx)
        for down in self._live():
            try:
                await self._forward(down, lambda c: c.set_logging_level(params.level))
            except MCPError as exc:  # a server without logging support
                log.debug("%s: logging/setLevel not forwarded: %s", down.name, exc)
        return types.EmptyResult()
