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

client.on("birth", () => {
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
  process.stdin.once("data", () => {
    client.stop(); // publishes NDEATH
    setTimeout(() => process.exit(0), 500);
  });
});
client.on("error", (e) => {
  process.stderr.write(String(e) + "\n");
  process.exit(1);
});
