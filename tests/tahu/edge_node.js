// An edge node built on Eclipse Tahu's sparkplug-client: births, data by alias, death.
// argv: serverUrl group node device samples startTs username password
"use strict";
const sparkplug = require("sparkplug-client");

const [url, group, node, device, samples, startTs, username, password] = process.argv.slice(2);
const n = Number(samples);
const t0 = Number(startTs);

const client = sparkplug.newClient({
  serverUrl: url,
  username: username || "",
  password: password || "",
  groupId: group,
  edgeNode: node,
  clientId: node,
  version: "spBv1.0",
  publishDeath: true,
});

let sent = false;

const births = () => {
  const now = Date.now();
  client.publishNodeBirth({
    timestamp: now,
    metrics: [{ name: "Node Control/Rebirth", type: "Boolean", value: false }],
  });
  client.publishDeviceBirth(device, {
    timestamp: now,
    metrics: [
      { name: "temp", alias: 1, type: "Double", value: 800.0, timestamp: now },
      { name: "speed", alias: 2, type: "Int16", value: -3, timestamp: now },
      { name: "count", alias: 3, type: "UInt32", value: 7, timestamp: now },
    ],
  });
};

const data = () => {
  for (let i = 0; i < n; i++) {
    client.publishDeviceData(device, {
      timestamp: Date.now(),
      metrics: [
        { alias: 1, type: "Double", value: 800.0 + i, timestamp: t0 + i * 1000 },
        { alias: 2, type: "Int16", value: -i, timestamp: t0 + i * 1000 },
        { alias: 3, type: "UInt32", value: 4000000000 + i, timestamp: t0 + i * 1000 },
      ],
    });
  }
  process.stdout.write("published\n");
};

// stdin lines from the test: "data" publishes the samples, "stop" ends with NDEATH.
let buffered = "";
process.stdin.on("data", (chunk) => {
  buffered += chunk;
  let nl;
  while ((nl = buffered.indexOf("\n")) >= 0) {
    const line = buffered.slice(0, nl).trim();
    buffered = buffered.slice(nl + 1);
    if (line === "data" && !sent) {
      sent = true;
      data();
    } else if (line === "stop") {
      client.stop(); // publishes NDEATH
      setTimeout(() => process.exit(0), 500);
    }
  }
});

client.on("birth", () => {
  births();
  process.stdout.write("born\n");
});

// A host's Rebirth request (NCMD Node Control/Rebirth) is answered with the births.
client.on("ncmd", (payload) => {
  const rebirth = (payload.metrics || []).some(
    (m) => m.name === "Node Control/Rebirth" && m.value === true
  );
  if (rebirth) births();
});
client.on("error", (e) => {
  process.stderr.write(String(e) + "\n");
  process.exit(1);
});
