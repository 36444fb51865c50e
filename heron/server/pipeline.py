"""One preparation path for every generating endpoint, read top to bottom.

::

    protocol model (chat, completions, ...)
      1. model name and fields     404 for an unknown model, 400 for a field we cannot honour
      2. to_spec(limits)           the request in neutral terms (GenerateSpec): field checks,
                                   server caps, SamplingParams           ValueError -> 400
      3. chat template, tokens     the chat rendered, prompts tokenized (token ids checked)
      4. context length            each prompt plus max_tokens fits the model's context
      5. tool plan                 what constrains the output, what reads tool calls out of it
      6. constraints compile       tools' parameter schemas, then the plan's constraint
      7. reasoning                 how a thinking model's output is split (chat routes); with
                                   thinking on, the constraint applies after the reasoning,
                                   which a thinking budget bounds
    -> PreparedRequest (prompts, SamplingParams with the constraint, tool-call parser,
       reasoning parser) or ErrorResponse

Endpoints differ only in how their protocol model converts itself (``to_spec``) and how they
format what the engine generates.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from heron.output_processor import Prompt
from heron.server.inputs import (
    ChatInput,
    GenerateRequest,
    GenerateSpec,
    TextInput,
    ThinkingBudget,
)
from heron.server.offload import leave_lane, offload, on_lane
from heron.server.protocol import ErrorResponse, bad_request
from heron.server.reasoning import ReasoningParser
from heron.server.serving import ServingContext, value_error
from heron.structured.params import StructuredOutputsParams
from heron.structured.tool_parsers import MistralParser, mistral_template_id
from heron.structured.tools import MarkerTokens, ToolPlan, plan_tool_use

if TYPE_CHECKING:
    from heron.lora import LoRARequest
    from heron.sampling_params import SamplingParams
    from heron.structured.tool_parsers import ToolParser


@dataclass
class PreparedRequest:
    """A request ready for the engine: its prompts (one choice group each), the sampling
    parameters every choice starts from, the parser that reads tool calls (or None) and the
    one that splits off the reasoning (or None)."""

    spec: GenerateSpec
    prompts: list[Prompt]
    params: SamplingParams
    tool_parser: ToolParser | None
    reasoning: ReasoningParser | None = None
    lora: LoRARequest | None = None  # the adapter the request's model names (None: the base)


class RequestError(Exception):
    """A step refused the request; ``error`` is the answer."""

    def __init__(self, error: ErrorResponse) -> None:
        super().__init__(error.error.message)
        self.error = error


async def prepare(ctx: ServingContext, request: GenerateRequest) -> PreparedRequest | ErrorResponse:
    """Run the steps in order; the first that refuses the request answers. A large request
    runs its heavy steps on the heavy lane (``heron.server.offload``) and leaves it here."""
    try:
        return await _prepare(ctx, request)
    except RequestError as e:
        return e.error
    except ValueError as e:
        return value_error(e, request)
    finally:
        leave_lane()


async def _prepare(ctx: ServingContext, request: GenerateRequest) -> PreparedRequest:
    refuse(ctx.check_model(request.model) or ctx.check_fields(request))
    spec = await offload(request.to_spec, ctx.limits)
    prompts = await tokenize(ctx, spec.input)
    for prompt in prompts:
        refuse(check_context(ctx, len(prompt.token_ids), spec.params.max_tokens, spec.input.what,
                             spec.max_tokens_field, spec.params.min_tokens))
    plan = await offload(plan_tools, spec, ctx.config.tool_call_parser, ctx.tool_markers)
    await check_constraints(ctx, spec, plan)
    reasoning = plan_reasoning(ctx.reasoning_parser, spec, prompts)
    budget = thinking_budget(spec.thinking_budget, reasoning, ctx.think_tags_are_tokens)
    params = spec.params.clone(structured_outputs=think_first(plan.constraint, reasoning, budget))
    if isinstance(plan.parser, MistralParser):  # its [TOOL_CALLS] is a special token: keep it
        params = params.clone(skip_special_tokens=False)
    return PreparedRequest(spec, prompts, params, plan.parser, reasoning,
                           ctx.lora_for(request.model))


def refuse(error: ErrorResponse | None) -> None:
    if error is not None:
        raise RequestError(error)


# ==== 3. chat template and tokens =================================================================


async def tokenize(ctx: ServingContext, source: ChatInput | TextInput) -> list[Prompt]:
    """The prompts of an input: a chat rendered with the template, or each prompt tokenized.
    ValueError for a template error; RequestError for a token id outside the vocabulary."""
    if isinstance(source, ChatInput):
        return [await render_chat(ctx, source)]
    if on_lane():
        return await offload(lambda: [text_prompt(ctx, item, source) for item in source.prompts])
    prompts = []
    for item in source.prompts:
        if isinstance(item, str):
            prompts.append(Prompt(await ctx.encode(item, source.add_special_tokens), item))
        else:
            prompts.append(text_prompt(ctx, item, source))
    return prompts


def text_prompt(ctx: ServingContext, item: str | list[int], source: TextInput) -> Prompt:
    """One prompt of a text input, tokenized here (token ids: checked against the vocabulary,
    RequestError outside it)."""
    if isinstance(item, str):
        return Prompt(ctx.tokenizer.encode(item, source.add_special_tokens), item)
    ids = [int(t) for t in item]
    refuse(check_token_ids(ctx, ids, source.what))
    # A prompt as long as the context is refused (check_context): not decoded (the tokenizer
    # holds the GIL while it decodes, ~0.5 s for 700,000 ids).
    decode = source.decode_token_prompts and len(ids) < ctx.info.max_model_len
    return Prompt(ids, ctx.tokenizer.decode(ids) if decode else "")


async def render_chat(ctx: ServingContext, chat: ChatInput) -> Prompt:
    """The chat template applied to the messages, tokenized. ValueError on a template error."""
    text = await offload(apply_template, ctx, chat)
    return Prompt(await ctx.encode(text, add_special_tokens=False), text)


def apply_template(ctx: ServingContext, chat: ChatInput) -> str:
    """The chat's text; ValueError naming the messages when the template fails."""
    messages = chat.messages
    if ctx.config.tool_call_parser == "mistral":
        messages = [mistral_ids(m) for m in messages]
    try:
        return ctx.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            tools=chat.tools,
            **chat.template_kwargs,
        )
    except ValueError as e:  # the message names the field: "messages: chat template error..."
        raise ValueError(f"{chat.what}: {e}") from e
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds; all mean "bad messages"
        raise ValueError(f"{chat.what}: the chat template could not render them: {e}") from e


def mistral_ids(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its call ids as Mistral's templates accept them (9 letters and digits;
    ``mistral_template_id``): ids other servers, clients or heron's other routes made (``call_``
    + hex, ``toolu_...``) would make the template refuse the conversation."""
    out = dict(message)
    if isinstance(out.get("tool_call_id"), str):
        out["tool_call_id"] = mistral_template_id(out["tool_call_id"])
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [{**c, "id": mistral_template_id(c["id"])}
                             if isinstance(c, dict) and isinstance(c.get("id"), str) else c
                             for c in calls]
    return out


def check_token_ids(ctx: ServingContext, ids: list[int], param: str) -> ErrorResponse | None:
    vocab = ctx.info.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is None:
        return None
    return bad_request(f"token id {bad} is outside the vocabulary [0, {vocab - 1}]", param=param)


# ==== 4. context length ===========================================================================


def check_context(
    ctx: ServingContext, num_prompt_tokens: int, max_tokens: int | None, what: str,
    max_tokens_field: str = "max_tokens", min_tokens: int = 0,
) -> ErrorResponse | None:
    """400 when the prompt is empty, or it plus max_tokens (the request's ``max_tokens_field``)
    does not fit in the context; without max_tokens, it plus min_tokens (which generation
    cannot stop before)."""
    limit = ctx.info.max_model_len
    if num_prompt_tokens == 0:
        return bad_request(
            f"the {what} is empty: at least one token is needed", code="empty_prompt"
        )
    wanted = num_prompt_tokens + (max_tokens or max(min_tokens, 1))
    if wanted <= limit:
        return None
    field = max_tokens_field if max_tokens or min_tokens <= 1 else "min_tokens"
    completion = (f"{max_tokens} in the completion" if max_tokens
                  else f"at least {wanted - num_prompt_tokens} to generate")
    return bad_request(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{wanted} tokens ({num_prompt_tokens} in the {what}, {completion}). Please reduce "
        f"the length of the {what} or {field}.",
        param=field,
        code="context_length_exceeded",
    )


# ==== 5. tool plan ================================================================================


def plan_tools(spec: GenerateSpec, tool_call_parser: str | None,
               markers: MarkerTokens | None = None) -> ToolPlan:
    """The output constraint and the tool-call parser (ValueError when tools, tool_choice and
    the response format do not fit together). ``tool_call_parser``: the server's setting;
    ``markers``: its call markers that are tokens of the vocabulary."""
    tools = spec.tools
    response = spec.constraint[1] if spec.constraint is not None else None
    if tools is None:
        return ToolPlan(response, None)
    return plan_tool_use(tools.specs, tools.choice, tools.named, tools.parallel,
                         tool_call_parser, response, tools.allowed, markers)


# ==== 6. constraints compile ======================================================================


async def check_constraints(ctx: ServingContext, spec: GenerateSpec, plan: ToolPlan) -> None:
    """RequestError (400) for a tool whose parameters do not compile, or a constraint that
    does not; the error names the field that set it."""
    for tool in spec.tools.specs if spec.tools is not None else []:
        refuse(await check_constraint(ctx, tool.parameters_constraint(), "tools"))
    source = spec.constraint
    param = source[0] if source is not None and source[1] == plan.constraint else "tools"
    refuse(await check_constraint(ctx, plan.constraint, param))


async def check_constraint(
    ctx: ServingContext, constraint: StructuredOutputsParams | None, param: str
) -> ErrorResponse | None:
    """400 naming ``param`` when a structured-output spec does not compile (checked on a
    thread the first time a spec is seen; cached after)."""
    if constraint is None or ctx.specs.is_known(constraint):
        return None
    try:
        await asyncio.to_thread(ctx.specs.check, constraint)
    except ValueError as e:
        return bad_request(f"{param}: {e}", param=param, code="invalid_constraint")
    return None


# ==== 7. reasoning ================================================================================


def plan_reasoning(name: str | None, spec: GenerateSpec,
                   prompts: list[Prompt]) -> ReasoningParser | None:
    """The reasoning parser of a chat request (``name``: the server's, None for none)."""
    if name is None or not isinstance(spec.input, ChatInput):
        return None
    return ReasoningParser.of(name, prompts[0].text)


def thinking_budget(budget: ThinkingBudget | None, reasoning: ReasoningParser | None,
                    tag_tokens: bool) -> int | None:
    """The bound to enforce on the reasoning (None: none). It holds where the output may think
    (a parser runs, thinking on) and the tags are tokens of the vocabulary; thinking off leaves
    nothing to bound. A strict budget (OpenAI's ``thinking_token_budget``) is a 400 where it
    cannot hold; Anthropic's ``budget_tokens`` (which ``enabled`` requires) is then ignored."""
    if budget is None or (reasoning is not None and not reasoning.grammar_mode):
        return None
    if reasoning is None:
        problem = "this model does not think (no reasoning parser runs)"
    elif not tag_tokens:
        problem = ("this model's vocabulary has no <think> / </think> tokens, and a budget is "
                   "enforced on those tokens only")
    else:
        return budget.tokens
    if budget.strict:
        raise ValueError(f"{budget.field}: {problem}")
    return None


def think_first(constraint: StructuredOutputsParams | None, reasoning: ReasoningParser | None,
                budget: int | None = None) -> StructuredOutputsParams | None:
    """The constraint as the engine applies it: after the reasoning when a parser splits one off
    and thinking is on (vLLM starts the grammar after ``</think>``), from the first token
    otherwise. The constraint was checked as sent; the reasoning block around it is fixed.
    ``budget``: at most that many tokens of reasoning; without a constraint, the output is then
    any text after a bounded reasoning."""
    if reasoning is None or not reasoning.grammar_mode:
        return constraint
    if constraint is None:
        return None if budget is None else StructuredOutputsParams.free_text(
            reasoning.grammar_mode, budget)
    return dataclasses.replace(constraint, think=reasoning.grammar_mode, think_budget=budget)
