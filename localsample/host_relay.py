"""What downstream servers send towards the host in `serve`: list-changed and
resource-updated notifications, log messages, elicitation and roots requests.

Each goes to the host session `serve` is talking to (none before the host's first
request); a host that cannot take it (no session, no elicitation or roots capability) gets
nothing, and the downstream server gets an error it understands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mcp import types
from mcp.client.session import ClientRequestContext, IncomingMessage, MessageHandlerFnT
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError

from localsample.errors import INVALID_REQUEST, METHOD_NOT_FOUND

log = logging.getLogger(__name__)


class HostRelay:
    """Relays to the host session ``host()`` returns (None while there is none)."""

    def __init__(self, host: Callable[[], ServerSession | None]) -> None:
        self.host = host

    def notification_handler(self, server: str) -> MessageHandlerFnT:
        """The message handler for server ``server``'s connection."""

        async def forward(message: IncomingMessage) -> None:
            host = self.host()
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
                log.debug("notification from %s not forwarded: %s", server, exc)

        return forward

    async def forward_log(self, params: types.LoggingMessageNotificationParams) -> None:
        host = self.host()
        if host is not None:
            try:
                await host.send_log_message(params.level, params.data, params.logger)
            except Exception as exc:
                log.debug("log message not forwarded: %s", exc)

    async def elicit(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        host = self.host()
        caps = types.ClientCapabilities(elicitation=types.ElicitationCapability())
        if host is None or not host.check_client_capability(caps) or not host.can_send_request:
            log.info("elicitation from a downstream server refused: the host cannot answer elicitation")
            return types.ErrorData(code=INVALID_REQUEST, message="the host does not support elicitation")
        try:
            return await host.send_request(types.ElicitRequest(params=params), types.ElicitResult)
        except MCPError as exc:
            return exc.error

    async def list_roots(self, context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        host = self.host()
        roots = types.ClientCapabilities(roots=types.RootsCapability())
        if host is None or not host.check_client_capability(roots) or not host.can_send_request:
            return types.ErrorData(code=METHOD_NOT_FOUND, message="the host does not support roots")
        try:
            return await host.list_roots()
        except MCPError as exc:
            return exc.error
