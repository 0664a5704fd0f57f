// Encodes a Sparkplug B payload with Eclipse Tahu's sparkplug-payload.
// stdin: a JSON payload object as Tahu takes it; stdout: the payload, base64.
"use strict";
const sparkplug = require("sparkplug-payload").get("spBv1.0");

let input = "";
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", () => {
  const bytes = sparkplug.encodePayload(JSON.parse(input));
  process.stdout.write(Buffer.from(bytes).toString("base64"));
});
