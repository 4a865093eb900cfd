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
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from mcp import Client, types
from mcp.client.session import ClientRequestContext, IncomingMessage, MessageHandlerFnT
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError

from localsample import __version__
from localsample.approval import ElicitationApprover
from localsample.client import ServerSpec, connect_error, first_cause, make_client, mcp_error_kind
from localsample.errors import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, ServerSpecError
from localsample.runtime import Runtime
from localsample.sampling import SamplingHandler

log = logging.getLogger(__name__)

SEPARATOR = "__"
REAP_INTERVAL = 5.0
"""Seconds between checks for idle models whose keep-alive has run out."""
Ctx = ServerRequestContext[Any, Any]
T = TypeVar("T")


class Downstream:
    """One downstream server and its live client (None once it is gone)."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.client: Client | None = None
        self.gone: str | None = None
        self.stop = anyio.Event()

    @property
    def name(self) -> str:
        return self.spec.name

    def require(self) -> Client:
        if self.client is None:
            raise MCPError(
                INTERNAL_ERROR,
                f"downstream server '{self.name}' is not available ({self.gone or 'not connected'}); "
                "fix: check its output above, then restart localsample serve",
            )
        return self.client


async def all_pages(fetch: Callable[[str | None], Awaitable[Any]], items: str) -> list[Any]:
    """Every item of a paginated list (bounded, so a broken paginator cannot hang us)."""
    found: list[Any] = []
    cursor: str | None = None
    for _ in range(100):
        page = await fetch(cursor)
        found.extend(getattr(page, items))
        cursor = page.next_cursor
        if not cursor:
            break
    return found


class Proxy:
    """The upstream server; ``run_stdio`` / ``run_http`` serve it until the host leaves."""

    def __init__(self, runtime: Runtime, specs: Sequence[ServerSpec]) -> None:
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
        self.downstreams = [Downstream(spec) for spec in specs]
        self.host: ServerSession | None = None
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

    # -- downstream connections ----------------------------------------------------------

    async def _hold(self, down: Downstream, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Keep one downstream connection open until shutdown; record why it ended."""
        sampling = SamplingHandler(self.runtime, server=down.name, ask=ElicitationApprover(lambda: self.host))
        client = make_client(
            down.spec,
            sampling,
            elicitation=self._elicit,
            list_roots=self._list_roots,
            logging_callback=self._forward_log,
            message_handler=self._forward_notification(down),
        )
        started = False
        try:
            async with client:
                down.client = client
                started = True
                task_status.started()
                log.info("connected to %s (%s, protocol %s)", down.name, down.spec.describe(), client.protocol_version)
                await down.stop.wait()
        except Exception as exc:
            error = connect_error(down.spec, first_cause(exc))
            down.gone = error.problem
            if not started:
                raise error from exc
            log.error("downstream server '%s' is gone: %s", down.name, error.problem)
        finally:
            down.client = None
            down.gone = down.gone or "it was shut down"

    async def serve(self, run_host: Callable[[], Awaitable[None]]) -> None:
        """Preload models, connect every downstream server, serve the host, then stop."""
        self.runtime.publishing = True
        background = anyio.CancelScope()  # preload and keep-alive: stopped when the host leaves

        async def housekeeping() -> None:
            with background:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._preload)
                    tasks.start_soon(self._reap_forever)

        async with anyio.create_task_group() as group:
            group.start_soon(housekeeping)
            for down in self.downstreams:
                await group.start(self._hold, down)
            if len(self.downstreams) == 1 and self.downstreams[0].client is not None:
                self.server.instructions = self.downstreams[0].client.instructions
            try:
                await run_host()
            finally:
                for down in self.downstreams:
                    down.stop.set()
                background.cancel()

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
            async with stdio_server() as (read, write):
                await self.server.run(read, write, self.init_options())

        await self.serve(host)

    async def run_http(self, host: str, port: int) -> None:
        import uvicorn

        app = self.server.streamable_http_app(host=host)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        log.info("serving MCP over Streamable HTTP at http://%s:%d/mcp", host, port)
        await self.serve(uvicorn.Server(config).serve)

    # -- calls from the host -------------------------------------------------------------

    def _seen(self, ctx: Ctx) -> None:
        self.host = ctx.session

    async def _forward(self, down: Downstream, call: Callable[[Client], Awaitable[T]]) -> T:
        """Run one forwarded request; a dead downstream becomes a clear error, not a hang."""
        client = down.require()
        try:
            return await call(client)
        except MCPError as exc:
            if mcp_error_kind(exc) != "closed":
                raise
            cause: BaseException = exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            cause = exc
        down.gone = down.gone or "it closed the connection"
        raise MCPError(
            INTERNAL_ERROR,
            f"downstream server '{down.name}' closed the connection (it exited or crashed; its own "
            "output is in localsample's stderr); fix: restart this MCP server in the host to reconnect",
        ) from cause

    async def _pages(self, down: Downstream, method: str, items: str) -> list[Any]:
        """Every page of one list method (``list_tools``, ...) of one downstream server."""
        return await self._forward(down, lambda c: all_pages(lambda cursor: getattr(c, method)(cursor=cursor), items))

    def _live(self) -> list[Downstream]:
        return [d for d in self.downstreams if d.client is not None]

    async def _named(self, kind: str) -> dict[str, tuple[Downstream, Any]]:
        """Tools or prompts of every server, colliding names prefixed with the server name."""
        listed: list[tuple[Downstream, Any]] = []
        for down in self._live():
            listed.extend((down, item) for item in await self._pages(down, f"list_{kind}", kind))
        counts: dict[str, int] = {}
        for _, item in listed:
            counts[item.name] = counts.get(item.name, 0) + 1
        exposed: dict[str, tuple[Downstream, Any]] = {}
        for down, item in listed:
            name = item.name if counts[item.name] == 1 else f"{down.name}{SEPARATOR}{item.name}"
            exposed[name] = (down, item)
        return exposed

    async def list_tools(self, ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        self._seen(ctx)
        exposed = await self._named("tools")
        self.tools = {name: (down, tool.name) for name, (down, tool) in exposed.items()}
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
        self.prompts = {name: (down, prompt.name) for name, (down, prompt) in exposed.items()}
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
        for down in self._live():
            for resource in await self._pages(down, "list_resources", "resources"):
                self.resources.setdefault(str(resource.uri), down)
                found.append(resource)
        return types.ListResourcesResult(resources=found)

    async def list_resource_templates(
        self, ctx: Ctx, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        self._seen(ctx)
        found: list[types.ResourceTemplate] = []
        for down in self._live():
            found += await self._pages(down, "list_resource_templates", "resource_templates")
        return types.ListResourceTemplatesResult(resource_templates=found)

    async def read_resource(self, ctx: Ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        self._seen(ctx)
        uri = str(params.uri)
        owner = self.resources.get(uri)
        candidates = [owner] if owner is not None else self._live()
        last: MCPError | None = None
        for down in candidates:
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
        owner = self.resources.get(uri)
        return [owner] if owner is not None else self._live()

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

    # -- from downstream servers to the host ---------------------------------------------

    def _forward_notification(self, down: Downstream) -> MessageHandlerFnT:
        async def forward(message: IncomingMessage) -> None:
            host = self.host
            if host is None or isinstance(message, Exception):
                return
            try:
                if isinstance(message, types.ResourceUpdatedNotification):
                    await host.send_resource_updated(message.params.uri)
                elif isinstance(message, types.ToolListChangedNotification):
                    await host.send_tool_list_changed()
                elif isinstance(message, types.PromptListChangedNotification):
                    await host.send_prompt_list_changed()
                elif isinstance(message, types.ResourceListChangedNotification):
                    await host.send_resource_list_changed()
            except Exception as exc:
                log.debug("notification from %s not forwarded: %s", down.name, exc)

        return forward

    async def _forward_log(self, params: types.LoggingMessageNotificationParams) -> None:
        if self.host is not None:
            try:
                await self.host.send_log_message(params.level, params.data, params.logger)
            except Exception as exc:
                log.debug("log message not forwarded: %s", exc)

    async def _elicit(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        host = self.host
        caps = types.ClientCapabilities(elicitation=types.ElicitationCapability())
        if host is None or not host.check_client_capability(caps) or not host.can_send_request:
            log.info("elicitation from a downstream server refused: the host cannot answer elicitation")
            return types.ErrorData(code=INVALID_REQUEST, message="the host does not support elicitation")
        try:
            return await host.send_request(types.ElicitRequest(params=params), types.ElicitResult)
        except MCPError as exc:
            return exc.error

    async def _list_roots(self, context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        host = self.host
        roots = types.ClientCapabilities(roots=types.RootsCapability())
        if host is None or not host.check_client_capability(roots) or not host.can_send_request:
            return types.ErrorData(code=METHOD_NOT_FOUND, message="the host does not support roots")
        try:
            return await host.list_roots()
        except MCPError as exc:
            return exc.error
