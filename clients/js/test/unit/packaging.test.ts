// The built package (dist/, made by `npm run build` before the tests): every
// entry point in "exports" exists with its types, and the only packages the
// built code imports are the optional peer dependencies.

import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, test } from 'vitest';

const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const pkg = JSON.parse(readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as {
  exports: Record<string, string | { types: string; import: string }>;
  dependencies?: Record<string, string>;
  peerDependencies: Record<string, string>;
  peerDependenciesMeta: Record<string, { optional?: boolean }>;
};

test('every entry point is built, with types', () => {
  const entries = Object.entries(pkg.exports).filter(([name]) => name !== './package.json');
  expect(entries.map(([name]) => name)).toEqual(['.', './react', './tanstack', './vue']);
  for (const [name, target] of entries) {
    if (typeof target === 'string') throw new Error(`${name}: expected { types, import }`);
    for (const file of [target.types, target.import]) {
      expect(existsSync(path.join(packageRoot, file)), `${name} -> ${file} (run npm run build)`).toBe(true);
    }
  }
});

test('no runtime dependencies: the built code imports only optional peers', () => {
  expect(pkg.dependencies ?? {}).toEqual({});
  for (const peer of Object.keys(pkg.peerDependencies)) expect(pkg.peerDependenciesMeta[peer]?.optional, peer).toBe(true);
  const imported = new Map<string, Set<string>>();
  const dist = path.join(packageRoot, 'dist');
  for (const file of readdirSync(dist).filter((name) => name.endsWith('.js'))) {
    const source = readFileSync(path.join(dist, file), 'utf8');
    for (const match of source.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+['"]([^'"]+)['"]|^\s*import\s+['"]([^'"]+)['"]/gm)) {
      const specifier = match[1] ?? match[2]!;
      if (!specifier.startsWith('.')) imported.set(file, (imported.get(file) ?? new Set()).add(specifier));
    }
  }
  expect(Object.fromEntries([...imported].map(([file, names]) => [file, [...names]]))).toEqual({
    'react.js': ['react'],
    'vue.js': ['vue'],
  });
});
