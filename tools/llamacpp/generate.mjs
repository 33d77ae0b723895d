// Greedy replies from a GGUF file in llama.cpp (node-llama-cpp's prebuilt binary), each
// prompt rendered with the chat template stored in the file by its Jinja engine.
// Input (stdin, JSON): {"model": path, "conversations": [[{role, content}, ...], ...],
// "max_tokens": n, "threads": n (optional; default: the physical cores)}. Output (stdout,
// JSON): per conversation the prompt as rendered and as tokens, the reply's tokens and text;
// plus the file's tokenizer metadata and chat template as llama.cpp read them.
import {readFileSync} from "node:fs";
import {getLlama, JinjaTemplateChatWrapper, LlamaLogLevel} from "node-llama-cpp";

const request = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model});
const template = model.fileInfo.metadata.tokenizer.chat_template;
if (!template)
    throw new Error(`${request.model}: no tokenizer.chat_template in the file`);
const wrapper = new JinjaTemplateChatWrapper({template, trimLeadingWhitespaceInResponses: false});
const context = await model.createContext({
    contextSize: Math.min(model.trainContextSize, 2048),
    // node-llama-cpp's default (maxThreads: 4 on 2 cores) oversubscribes: 0.4 s a token here.
    threads: request.threads || llama.cpuMathCores
});
const sequence = context.getSequence();

const toHistory = (messages) => messages.map(({role, content}) => (
    role === "system" ? {type: "system", text: content}
        : role === "user" ? {type: "user", text: content}
            : {type: "model", response: [content]}
));
const results = [];
for (const messages of request.conversations) {
    const {contextText} = wrapper.generateContextState({
        chatHistory: [...toHistory(messages), {type: "model", response: []}]
    });
    const prompt = contextText.tokenize(model.tokenizer);
    const reply = [];
    await sequence.clearHistory();
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        if (model.isEogToken(token) || reply.length >= request.max_tokens)
            break;
        reply.push(token);
    }
    results.push({
        prompt_text: contextText.toString(),
        prompt_tokens: prompt,
        reply_tokens: reply,
        reply: model.detokenize(reply, false)
    });
}
const tokenizer = model.fileInfo.metadata.tokenizer.ggml;
console.log(JSON.stringify({
    pre: tokenizer.pre,
    chat_template: template,
    eog: {eos: model.tokens.eos, eot: model.tokens.eot},
    results
}));
await llama.dispose();
