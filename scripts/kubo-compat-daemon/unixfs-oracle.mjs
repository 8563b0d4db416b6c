// Independent CID oracle for tests: the js UnixFS importer that js-ipfs uses, on a local path.
// usage: node unixfs-oracle.mjs PATH [CID_VERSION [SHARD_AT]]  -> the root CID of a file or folder
// Folders: links sorted by name, empty sub-folders kept, hidden files included (the same as
// `ipfs add -r --hidden` on folders below Kubo's HAMT threshold). No sharding unless SHARD_AT is
// given: then every folder with at least SHARD_AT entries is HAMT-sharded. This importer decides
// by entry count where Kubo estimates bytes, so it checks the shard *encoding*, not the threshold.
import { importer } from 'ipfs-unixfs-importer'
import { createReadStream, readdirSync, statSync } from 'node:fs'
import { basename, join } from 'node:path'

const [target, version = '0', shardAt] = process.argv.slice(2)
const cidVersion = Number(version)

function * entries (abs, rel) {
  const st = statSync(abs)
  if (st.isDirectory()) {
    yield { path: rel }
    for (const name of readdirSync(abs).sort()) yield * entries(join(abs, name), `${rel}/${name}`)
  } else {
    yield { path: rel, content: createReadStream(abs, { highWaterMark: 1 << 20 }) }
  }
}

const blockstore = { put: async (cid) => cid, has: async () => false, get: async () => { throw new Error('no get') } }
const options = {
  cidVersion,
  rawLeaves: cidVersion === 1,
  onlyHash: true,
  shardSplitThreshold: shardAt === undefined ? Infinity : Number(shardAt),
  wrapWithDirectory: false
}
let root
for await (const entry of importer(entries(target, basename(target)), blockstore, options)) {
  if (entry.path === basename(target)) root = entry.cid
}
process.stdout.write(root.toString() + '\n')
