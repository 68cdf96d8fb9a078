// Builds policy.js into a Parley save-error-policy component with componentize-js' API
// (the `jco componentize` command of jco 1.35 fails with "failed to get path metadata" here).
// Usage: node build.mjs [OUT.wasm]
import { componentize } from '@bytecodealliance/componentize-js';
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const source = await readFile(here('./policy.js'), 'utf8');
const { component } = await componentize(source, {
  witPath: here('../../wit'),
  worldName: 'save-error-policy',
  // No ambient capabilities: the policy needs none, and the host grants none it did not ask for.
  disableFeatures: ['random', 'stdio', 'clocks', 'http', 'fetch-event'],
});
await writeFile(process.argv[2] ?? here('./policy.wasm'), component);
