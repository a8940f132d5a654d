"""The deployment's conversation engine from Settings (model, tools, texts)."""

from __future__ import annotations

from bridge.config import Settings
from bridge.conversation.chat import ChatModel, OfflineChatModel, StreamingChatModel
from bridge.conversation.engine import ConversationEngine, ConversationSettings
from bridge.conversation.tools import HttpToolConfig, ToolSettings
from bridge.responder import DEFAULT_SYSTEM_PROMPT

PROMPT_TOOLS = (" You can act through tools: call end_call after saying goodbye when the conversation is over, "
                "send_dtmf to press keys in a phone menu, and consult_agent when you need information you do not "
                "have.")


def create_model(settings: Settings) -> ChatModel:
    if settings.responseModel in ("offline", "none", ""):
        return OfflineChatModel()
    key = settings.responseApiKey.get_secret_value() if settings.responseApiKey else None
    return StreamingChatModel(base_url=settings.responseBaseUrl, api_key=key, model=settings.responseModel,
                              timeout_s=settings.responseTimeoutMs / 1000)


def create_conversation(settings: Settings) -> ConversationEngine:
    agent = settings.agent
    tools = ToolSettings(
        http_tools=[HttpToolConfig(name=t.name, description=t.description, parameters=t.parameters, url=t.url,
                                   timeout_ms=t.timeoutMs, secret=t.secret.get_secret_value() if t.secret else None,
                                   filler=t.filler) for t in agent.tools],
        consult_enabled=agent.consult, consult_filler=agent.consultFiller or None,
        tool_filler=agent.toolFiller or None)
    prompt = (settings.responseSystemPrompt or DEFAULT_SYSTEM_PROMPT) + PROMPT_TOOLS
    return ConversationEngine(create_model(settings), ConversationSettings(
        system_prompt=prompt, apology=agent.apology, on_failure=agent.onFailure, max_failures=agent.maxFailures,
        max_tool_rounds=agent.maxToolRounds, min_clause_chars=agent.minClauseChars, tools=tools))
