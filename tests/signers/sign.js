// A command signer in JavaScript, with node's built-in crypto only (DESIGN.md, "Commands").
//
//   node sign.js OPERATOR_KEY.pem < envelope.json              the envelope, signed
//   node sign.js OPERATOR_KEY.pem --canonical < envelope.json  the bytes it signs
//
// envelope.json: {"id", "device_id", "name", "args", "issued_at", "expires_at"}; the key: the
// operator's Ed25519 private key, PKCS#8 PEM (simkeeper fleet keygen). The signed bytes are
// JSON.stringify of the envelope rebuilt with its keys sorted at every level: under DESIGN.md's
// rule (no floats, integers within +-(2^53-1), keys [A-Za-z_][A-Za-z0-9_-]*) they are the
// device's bytes. This example does not check the rule; the device refuses, saying why.
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");

function sorted(value) {
  if (Array.isArray(value)) return value.map(sorted);
  if (value === null || typeof value !== "object") return value;
  const out = {};
  for (const key of Object.keys(value).sort()) out[key] = sorted(value[key]);
  return out;
}

const [keyFile, mode] = process.argv.slice(2);
const envelope = JSON.parse(fs.readFileSync(0, "utf8"));
delete envelope.sig;
const signed = Buffer.from(JSON.stringify(sorted(envelope)), "utf8");
if (mode === "--canonical") {
  process.stdout.write(signed);
} else {
  const key = crypto.createPrivateKey(fs.readFileSync(keyFile));
  const sig = crypto.sign(null, signed, key).toString("base64url");
  process.stdout.write(JSON.stringify({ ...envelope, sig }) + "\n");
}
