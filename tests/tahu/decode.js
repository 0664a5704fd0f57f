// Decodes Sparkplug B payloads with Eclipse Tahu's sparkplug-payload.
// stdin: JSON list of base64 payloads; stdout: JSON list of decoded payloads.
"use strict";
const sparkplug = require("sparkplug-payload").get("spBv1.0");

const plain = (v) => {
  if (v === null || v === undefined) return v;
  if (typeof v.toString === "function" && v.high !== undefined && v.low !== undefined) {
    return v.toString(); // a Long: keep every digit
  }
  if (Array.isArray(v)) return v.map(plain);
  if (typeof v === "object" && !(v instanceof Buffer)) {
    const out = {};
    for (const [k, x] of Object.entries(v)) out[k] = plain(x);
    return out;
  }
  return v;
};

let input = "";
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", () => {
  const out = JSON.parse(input).map((b64) =>
    plain(sparkplug.decodePayload(new Uint8Array(Buffer.from(b64, "base64"))))
  );
  process.stdout.write(JSON.stringify(out));
});
