// What the browser tests share: the real moss binary started on a free port, and Debian's
// chromium driven by playwright-core.
import { spawn } from "node:child_process";
import { join, resolve } from "node:path";
import { chromium } from "playwright-core";

export const root = resolve(import.meta.dirname, "..", "..");
export const bin = process.env.MOSS_BIN || join(root, "target", "debug", "moss");

// Starts `moss serve ARGS` and waits for its address and first-admin invitation link.
export async function serve(args, env) {
  const server = spawn(bin, ["serve", ...args, "--addr", "127.0.0.1:0"], { env, stdio: ["ignore", "pipe", "inherit"] });
  const lines = await new Promise((ok, fail) => {
    let out = "";
    server.stdout.on("data", (d) => {
      out += d;
      if (out.includes("/register?code=")) ok(out);
    });
    server.on("exit", (c) => fail(new Error(`moss serve exited ${c}: ${out}`)));
  });
  return {
    server,
    base: lines.match(/listening on (\S+)/)[1],
    invite: lines.match(/(http:\/\/\S+\/register\?code=\S+)/)[1],
  };
}

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}
