// Shows the text our nodes return with ui.PreviewText (token counts, prompt warnings, caption checks) on the
// node itself. The stock frontend draws such text only on its own Preview-as-Text nodes, so we attach its
// text-preview widgets to ours.
import { app } from "../../scripts/app.js";

const NODES_WITH_TEXT = new Set(["IG4TextEncode", "IG4JsonPrompt", "IG4LoraLoader", "IG4PromptUpsample"]);

app.registerExtension({
  name: "ideogram4_gguf.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_TEXT.has(nodeData.name)) return;
    const helpers = window.comfyAPI?.textPreviewWidgets;
    if (!helpers) return; // older frontends: the text is still in the history and the ws message
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onCreated?.apply(this, arguments);
      helpers.addTextPreviewWidgets(this);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      helpers.updateTextPreviewWidgets(this, output);
    };
  },
});
