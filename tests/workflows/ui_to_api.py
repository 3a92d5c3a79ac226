"""UI-format workflow (the frontend's save format, version 0.4) -> API prompt, for the tests.

The rules are the frontend's (`graphToPrompt`, checked against ComfyUI frontend 1.47.10 on the shipped workflows):
- UI-only nodes (notes) and muted (mode 2) / bypassed (mode 4) nodes are dropped; a link out of a bypassed node
  is followed back through it to the link feeding its input of the same type (the same slot first);
- a node's widget inputs, in the schema's `input_order` (required, then optional), take the `widgets_values`
  slots one by one; a widget with `control_after_generate` (the seed) has one more slot right after it for the
  control value ("randomize", ...), which is UI state and never reaches the API;
- a linked input (a socket, or a widget turned into a socket) is `[origin_id, origin_slot]`; the link wins over
  the widget's stored value.

The schemas are `/object_info`-shaped dicts: from a live server, or `pack_object_info()` (the pack's own
schemas through the comfy_api stand-in, plus `CORE_NODES`). Subgraphs, reroutes and primitive nodes are not
handled: the shipped workflows do not use them.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY = {"Note", "MarkdownNote"}
SKIPPED_MODES = {2, 4}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

# The core nodes the shipped workflows use, as ComfyUI 0.29.0's /object_info reports them (reduced: KSamplerSelect
# lists the first samplers only; LoraLoaderModelOnly's lora list is the server's loras folder, empty here).
CORE_NODES = {
    "LoraLoaderModelOnly": {
        "input": {"required": {"model": ["MODEL"], "lora_name": [[]],
                               "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}]}},
        "input_order": {"required": ["model", "lora_name", "strength_model"]},
        "output": ["MODEL"], "output_name": ["MODEL"],
        "name": "LoraLoaderModelOnly", "display_name": "Load LoRA", "output_node": False,
    },
    "KSamplerSelect": {
        "input": {"required": {"sampler_name": ["COMBO", {"multiselect": False,
                                                          "options": ["euler", "euler_cfg_pp", "euler_ancestral"]}]}},
        "input_order": {"required": ["sampler_name"]},
        "output": ["SAMPLER"], "output_name": ["SAMPLER"],
        "name": "KSamplerSelect", "display_name": None, "output_node": False,
    },
    "SamplerCustomAdvanced": {
        "input": {"required": {"noise": ["NOISE", {}], "guider": ["GUIDER", {}], "sampler": ["SAMPLER", {}],
                               "sigmas": ["SIGMAS", {}], "latent_image": ["LATENT", {}]}},
        "input_order": {"required": ["noise", "guider", "sampler", "sigmas", "latent_image"]},
        "output": ["LATENT", "LATENT"], "output_name": ["output", "denoised_output"],
        "name": "SamplerCustomAdvanced", "display_name": None, "output_node": False,
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}],
                               "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "input_order": {"required": ["images", "filename_prefix"]},
        "output": ["IMAGE"], "output_name": ["images"],
        "name": "SaveImage", "display_name": "Save Image", "output_node": True,
    },
}


class WorkflowError(ValueError):
    """A UI workflow that does not fit the node schemas."""


def pack_object_info() -> dict:
    """The pack's node schemas (through whatever `comfy_api` is installed) plus the core nodes used."""
    from ideogram4_gguf.nodes import NODES

    info = {}
    for node in NODES:
        schema = node.define_schema()
        info[schema.node_id] = schema.object_info()
    return {**info, **CORE_NODES}


def ordered_inputs(info: dict):
    """(name, spec, required) for each input in `input_order`, required first."""
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            yield name, specs[name], section == "required"


def is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def has_control_slot(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")  # the frontend adds one to these unasked


def widget_slots(info: dict) -> list[tuple[str, object]]:
    """The layout of `widgets_values`: (input name, spec) per slot; a control slot is (name, CONTROL_VALUES)."""
    slots = []
    for name, spec, _ in ordered_inputs(info):
        if is_widget(spec):
            slots.append((name, spec))
            if has_control_slot(name, spec):
                slots.append((name, CONTROL_VALUES))
    return slots


def widget_values(node: dict, info: dict) -> dict[str, object]:
    """Input name -> stored widget value of a UI node (control values left out)."""
    slots = widget_slots(info)
    values = node.get("widgets_values") or []
    if len(values) != len(slots):
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {len(slots)} slots "
                            f"({[name for name, _ in slots]})")
    stored = {}
    for (name, spec), value in zip(slots, values):
        if spec is CONTROL_VALUES:
            if value not in CONTROL_VALUES:
                raise WorkflowError(f"node {node['id']}: {value!r} after {name} is not a control value")
            continue
        stored[name] = {"__value__": value} if isinstance(value, list) else value
    return stored


def kept_nodes(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] not in UI_ONLY and n.get("mode", 0) not in SKIPPED_MODES]


def convert(workflow: dict, object_info: dict) -> dict:
    """The API prompt ({node id: {"class_type", "inputs", "_meta"}}) the frontend would queue."""
    links = {link[0]: link for link in workflow["links"]}  # [id, origin_id, origin_slot, target_id, target_slot, type]
    nodes = kept_nodes(workflow)
    kept_ids = {n["id"] for n in nodes}
    by_id = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in nodes:
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']}: unknown node type {node['type']!r}")
        linked = {}
        for entry in node.get("inputs", []):
            link = _through_bypassed(links.get(entry.get("link")), links, by_id)
            if link is not None and link[1] in kept_ids:
                linked[entry["name"]] = [str(link[1]), link[2]]
        stored = widget_values(node, info)
        inputs = {}
        for name, _, _ in ordered_inputs(info):
            if name in linked:
                inputs[name] = linked[name]
            elif name in stored:
                inputs[name] = stored[name]
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _through_bypassed(link, links: dict, nodes: dict):
    """The link that really feeds an input: while the origin is bypassed (mode 4), the link into its input of the
    link's type (the same slot first)."""
    while link is not None and nodes.get(link[1], {}).get("mode", 0) == 4:
        inputs = nodes[link[1]].get("inputs", [])
        candidates = [i for i, entry in enumerate(inputs) if entry["type"] == link[5]]
        if not candidates:
            return None
        slot = link[2] if link[2] in candidates else candidates[0]
        link = links.get(inputs[slot].get("link"))
    return link


def execution_order(prompt: dict) -> list[str]:
    """Node ids so that every node comes after the nodes it takes inputs from."""
    order, seen = [], set()

    def visit(node_id, path=()):
        if node_id in seen:
            return
        if node_id in path:
            raise WorkflowError(f"cycle through node {node_id}")
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                visit(value[0], path + (node_id,))
        seen.add(node_id)
        order.append(node_id)

    for node_id in prompt:
        visit(node_id)
    return order
