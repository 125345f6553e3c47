// CPU time V8 spends compiling each given Wasm module, the way proxy-wasm has V8 compile it:
// all of it, with TurboFan only. Run with
//   node --no-liftoff --no-wasm-lazy-compilation --single-threaded v8_compile.js ROUNDS A.wasm B.wasm...
// The modules take turns in each round; prints one JSON object: per module, the median
// milliseconds and the median over the rounds of its time over the first module's.
"use strict";
const fs = require("fs");

const [rounds, ...files] = process.argv.slice(2);
const modules = files.map((file) => fs.readFileSync(file));
const times = files.map(() => []);
let compiled = 0;

// V8 reuses the compilation of identical bytes; a custom section with a fresh name makes each
// compile a new one.
function fresh(bytes) {
  const name = Buffer.from(`bench-${compiled++}`);
  const payload = Buffer.concat([Buffer.from([name.length]), name]);
  return Buffer.concat([bytes, Buffer.from([0, payload.length]), payload]);
}

for (let round = 0; round < Number(rounds); round++) {
  modules.forEach((bytes, i) => {
    const input = fresh(bytes);
    const before = process.cpuUsage();
    new WebAssembly.Module(input);
    const spent = process.cpuUsage(before);
    times[i].push((spent.user + spent.system) / 1000);
  });
}

const median = (values) => values.slice().sort((a, b) => a - b)[values.length >> 1];
const result = {};
files.forEach((file, i) => {
  result[file] = {
    median_ms: median(times[i]),
    ratio: median(times[i].map((t, round) => t / times[0][round])),
  };
});
console.log(JSON.stringify(result));
