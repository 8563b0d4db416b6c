#!/usr/bin/env node
// A js-libp2p peer that speaks the dsi wire contract (proto/dsi/v1/task.proto), for the
// interoperability tests in tests/test_p2p_interop_js.py.
//
// TCP on 127.0.0.1 only, Noise only, yamux, identify, gossipsub with StrictSign (heartbeat 1 s).
// Messages are the .proto files loaded at run time with protobufjs: nothing is hand-encoded.
// Every stream of "/dsi/task/1.0.0" carries one varint length-prefixed TaskRequest and one
// varint length-prefixed TaskResponse (at most 4 MiB each).
//
// Prints one JSON object per line on stdout for each event; diagnostics go to stderr. It always
// exits by itself: after its work, or with {"event":"error"} and exit code 2 at --timeout.
//
//   node peer.mjs worker --connect <multiaddr/p2p/id> [--task-id ID] [--result JSON]
//                        [--capabilities a,b] [--wait-gossip S] [--timeout S]
//     Dials the dsi node, subscribes to "dsi/tasks/v1", waits for a TaskOffer on gossip and
//     lists the owner's offers (ListRequest), claims the task twice at once (one grant, one
//     ERROR_CODE_ALREADY_CLAIMED expected), heartbeats, tries a complete with a wrong lease id,
//     completes with the lease id and a UTF-8 JSON result, asks for the status, exits.
//
//   node peer.mjs owner [--task-id ID] [--task-type T] [--data JSON] [--priority N]
//                       [--tags a,b] [--requires a,b] [--lease-seconds S] [--linger S]
//                       [--timeout S]
//     Serves "/dsi/task/1.0.0" for one task it owns and offers it on "dsi/tasks/v1" every
//     second until it is claimed. Grants one claim (lease), refuses others with
//     ERROR_CODE_ALREADY_CLAIMED, accepts heartbeat / complete / fail only from the peer that
//     holds the lease (the stream's authenticated remote peer) with the right lease id, answers
//     status and list. Exits --linger seconds after the task completed or failed.

// Node 20 has no Promise.withResolvers, which current js-libp2p dependencies use: polyfill it
// before any of them is loaded (hence the dynamic imports below).
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { parseArgs } = await import('node:util')
const { randomUUID } = await import('node:crypto')
const path = await import('node:path')
const { fileURLToPath } = await import('node:url')
const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { gossipsub } = await import('@chainsafe/libp2p-gossipsub')
const { multiaddr } = await import('@multiformats/multiaddr')
const lp = await import('it-length-prefixed')
const protobuf = (await import('protobufjs')).default

const PROTOCOL = '/dsi/task/1.0.0'
const TOPIC = 'dsi/tasks/v1'
const MAX_FRAME = 4 * 1024 * 1024
const HERE = path.dirname(fileURLToPath(import.meta.url))
const DEFAULT_PROTO = path.resolve(HERE, '..', '..', '..', 'proto', 'dsi', 'v1', 'task.proto')

// ---------------------------------------------------------------- output
function emit (event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n')
}

function fail (message, code = 2) {
  emit('error', { message })
  process.exit(code)
}

// ---------------------------------------------------------------- arguments
const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    connect: { type: 'string' },
    proto: { type: 'string', default: DEFAULT_PROTO },
    'task-id': { type: 'string' },
    'task-type': { type: 'string', default: 'interop' },
    data: { type: 'string', default: '{}' },
    result: { type: 'string', default: '{"ok":true}' },
    priority: { type: 'string', default: '5' },
    tags: { type: 'string', default: 'P2P_ELIGIBLE' },
    requires: { type: 'string', default: '' },
    capabilities: { type: 'string', default: '' },
    'lease-seconds': { type: 'string', default: '30' },
    'wait-gossip': { type: 'string', default: '15' },
    linger: { type: 'string', default: '5' },
    timeout: { type: 'string', default: '60' },
    'request-timeout': { type: 'string', default: '10' }
  }
})
const role = positionals[0]
if (role !== 'worker' && role !== 'owner') {
  fail('usage: node peer.mjs worker|owner [options] (see the comment at the top)')
}
const list = (s) => (s ?? '').split(',').map((x) => x.trim()).filter(Boolean)
const seconds = (name) => {
  const v = Number(opts[name])
  if (!Number.isFinite(v) || v < 0) fail(`--${name} must be a number of seconds`)
  return v
}
const TIMEOUT_S = seconds('timeout')
const REQUEST_TIMEOUT_MS = seconds('request-timeout') * 1000

// Never hang a test: the whole run has a deadline.
setTimeout(() => fail(`${role} timed out after ${TIMEOUT_S}s`), TIMEOUT_S * 1000)

// ---------------------------------------------------------------- the wire contract
// keepCase: the .proto field names (task_id, owner_addrs, ...) are the contract, not camelCase.
const root = await new protobuf.Root().load(opts.proto, { keepCase: true })
const T = {
  Announcement: root.lookupType('dsi.v1.Announcement'),
  TaskRequest: root.lookupType('dsi.v1.TaskRequest'),
  TaskResponse: root.lookupType('dsi.v1.TaskResponse')
}

function encode (type, obj) {
  // verify() refuses unknown-typed values; unknown names would be dropped silently by
  // fromObject, so check them too: a misspelt field must fail here, not on the wire.
  const msg = type.fromObject(obj) // enum names -> numbers, numbers -> uint64
  const problem = unknownField(type, obj) || type.verify(msg)
  if (problem) throw new Error(`${type.fullName}: ${problem}`)
  return type.encode(msg).finish()
}

function unknownField (type, obj) {
  for (const [key, value] of Object.entries(obj)) {
    const field = type.fields[key]
    if (!field) return `no field ${key}`
    field.resolve()
    if (field.resolvedType instanceof protobuf.Type && value !== null) {
      for (const item of field.repeated ? value : [value]) {
        const problem = unknownField(field.resolvedType, item)
        if (problem) return `${key}.${problem}`
      }
    }
  }
  return null
}

function decode (type, bytes) {
  return type.toObject(type.decode(bytes), {
    longs: Number, enums: String, defaults: true, arrays: true, oneofs: true
  })
}

const utf8 = new TextDecoder('utf-8', { fatal: true })
const jsonBytes = (value) => new TextEncoder().encode(JSON.stringify(value))
function parseJsonBytes (bytes) {
  if (!bytes || bytes.length === 0) return null
  return JSON.parse(utf8.decode(bytes))
}

function withTimeout (promise, ms, what) {
  let timer
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

// One varint length-prefixed frame from a stream (at most MAX_FRAME bytes of body).
async function readFrame (stream, what) {
  const frames = lp.decode(stream.source, { maxDataLength: MAX_FRAME })
  const next = await withTimeout(frames.next(), REQUEST_TIMEOUT_MS, `reading ${what}`)
  if (next.done) throw new Error(`stream ended before ${what}`)
  return next.value.subarray()
}

// ---------------------------------------------------------------- the host
async function startHost () {
  const node = await createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    // Only 127.0.0.1, only the peers we are told about.
    connectionGater: {
      denyDialMultiaddr: (ma) => !ma.toString().startsWith('/ip4/127.0.0.1/')
    },
    services: {
      identify: identify(),
      pubsub: gossipsub({
        globalSignaturePolicy: 'StrictSign',
        heartbeatInterval: 1000,
        allowPublishToZeroTopicPeers: true,
        emitSelf: false
      })
    }
  })
  await node.start()
  return node
}

function exitWith (node, code) {
  const hardStop = setTimeout(() => process.exit(code), 3000)
  hardStop.unref()
  node.stop().catch(() => {}).finally(() => process.exit(code))
}

// ---------------------------------------------------------------- worker
async function runWorker () {
  if (!opts.connect) fail('worker needs --connect <multiaddr with /p2p/<peer id>>')
  const caps = list(opts.capabilities)
  const node = await startHost()
  const pubsub = node.services.pubsub
  emit('ready', { role, peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

  // One request, one response, on a new stream. `lazy` sends the protocol id and the request
  // together (multistream-select without the round trip, as go-libp2p does).
  async function request (peer, body, { lazy = false } = {}) {
    const stream = await node.dialProtocol(peer, PROTOCOL, {
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      negotiateFully: !lazy
    })
    try {
      const frame = lp.encode.single(encode(T.TaskRequest, body))
      const [, bytes] = await withTimeout(
        Promise.all([stream.sink([frame]), readFrame(stream, 'the response')]),
        REQUEST_TIMEOUT_MS, `${Object.keys(body)[0]} request`
      )
      await stream.close().catch(() => {})
      return decode(T.TaskResponse, bytes)
    } catch (err) {
      stream.abort(err)
      throw err
    }
  }

  const describeResponse = (resp) => {
    if (resp.body === 'error') return { body: 'error', code: resp.error.code, message: resp.error.message }
    return { body: resp.body }
  }

  // Gossip: every announcement is printed; offers also resolve the wait below.
  let gossipOffer
  let gossipOfferSeen
  const offerSeen = new Promise((resolve) => { gossipOfferSeen = resolve })
  pubsub.addEventListener('message', (evt) => {
    const msg = evt.detail
    if (msg.topic !== TOPIC) return
    let ann
    try {
      ann = decode(T.Announcement, msg.data)
    } catch (err) {
      emit('bad_announcement', { message: String(err) })
      return
    }
    const origin = msg.type === 'signed' ? msg.from.toString() : null
    if (ann.body === 'offer') {
      const o = ann.offer
      emit('offer', {
        source: 'gossip',
        signed: msg.type === 'signed',
        origin,
        origin_matches: origin === o.owner_peer_id,
        task_id: o.task_id,
        task_type: o.task_type,
        priority: o.priority,
        tags: o.tags,
        requires: o.requires,
        owner_peer_id: o.owner_peer_id,
        owner_addrs: o.owner_addrs,
        submitted_at_ms: o.submitted_at_ms,
        attempt: o.attempt
      })
      if (!opts['task-id'] || o.task_id === opts['task-id']) {
        gossipOffer = gossipOffer ?? o
        gossipOfferSeen(o)
      }
    } else if (ann.body === 'update') {
      const u = ann.update
      emit('update', {
        origin,
        origin_matches: origin === u.owner_peer_id,
        task_id: u.task_id,
        state: u.state,
        worker_peer_id: u.worker_peer_id,
        attempt: u.attempt
      })
    }
  })
  pubsub.subscribe(TOPIC)

  const target = multiaddr(opts.connect)
  const owner = target.getPeerId()
  if (!owner) fail('--connect must end with /p2p/<peer id>')
  const conn = await node.dial(target, { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) })
  emit('connected', { peer_id: conn.remotePeer.toString(), remote_addr: conn.remoteAddr.toString() })
  const ownerId = conn.remotePeer

  // Recover offers without gossip: ask the owner (lazy negotiation).
  let listed = []
  for (let i = 0; i < 20; i++) {
    const resp = await request(ownerId, { list: { capabilities: caps, limit: 10 } }, { lazy: true })
    if (resp.body !== 'list') fail(`list answered ${JSON.stringify(describeResponse(resp))}`)
    listed = resp.list.offers
    if (listed.some((o) => !opts['task-id'] || o.task_id === opts['task-id'])) break
    await new Promise((resolve) => setTimeout(resolve, 250))
  }
  emit('list', {
    offers: listed.map((o) => ({
      task_id: o.task_id,
      task_type: o.task_type,
      owner_peer_id: o.owner_peer_id,
      owner_addrs: o.owner_addrs,
      attempt: o.attempt
    }))
  })
  const listedOffer = listed.find((o) => !opts['task-id'] || o.task_id === opts['task-id'])

  // Gossip is a hint: wait for it a while, but the listed offer is enough to go on.
  const waitGossipMs = seconds('wait-gossip') * 1000
  const heard = await Promise.race([
    offerSeen,
    new Promise((resolve) => setTimeout(() => resolve(null), waitGossipMs))
  ])
  if (!heard) emit('gossip_missed', { waited_s: waitGossipMs / 1000 })
  const offer = gossipOffer ?? listedOffer
  if (!offer) fail('no offer for the task, neither on gossip nor listed by the owner')
  const taskId = offer.task_id

  // Two claims at once: the owner alone arbitrates, exactly one may win.
  const claims = await Promise.all([
    request(ownerId, { claim: { task_id: taskId, capabilities: caps } }),
    request(ownerId, { claim: { task_id: taskId, capabilities: caps } }, { lazy: true })
  ])
  const grants = claims.filter((r) => r.body === 'grant')
  const refusals = claims.filter((r) => r.body !== 'grant').map(describeResponse)
  emit('claims', { grants: grants.length, refusals })
  if (grants.length !== 1) fail(`expected exactly one grant, got ${grants.length}`)
  const grant = grants[0].grant
  emit('granted', {
    task_id: grant.task_id,
    lease_id: grant.lease_id,
    lease_expires_at_ms: grant.lease_expires_at_ms,
    task_type: grant.task_type,
    data: parseJsonBytes(grant.data),
    data_cid: grant.data_cid,
    attempt: grant.attempt
  })

  const hb = await request(ownerId, { heartbeat: { task_id: taskId, lease_id: grant.lease_id } })
  emit('heartbeat', { response: describeResponse(hb), state: hb.ack?.state })

  const wrong = await request(ownerId, {
    complete: { task_id: taskId, lease_id: 'not-' + grant.lease_id, result: jsonBytes({ forged: true }) }
  })
  emit('complete_wrong_lease', describeResponse(wrong))

  const result = JSON.parse(opts.result)
  const done = await request(ownerId, {
    complete: { task_id: taskId, lease_id: grant.lease_id, result: jsonBytes(result) }
  })
  if (done.body !== 'ack') fail(`complete answered ${JSON.stringify(describeResponse(done))}`)
  emit('completed', { task_id: done.ack.task_id, state: done.ack.state })

  const st = await request(ownerId, { status: { task_id: taskId } }, { lazy: true })
  emit('status', st.body === 'status'
    ? {
        task_id: st.status.task_id,
        state: st.status.state,
        worker_peer_id: st.status.worker_peer_id,
        attempt: st.status.attempt,
        result: parseJsonBytes(st.status.result)
      }
    : describeResponse(st))

  emit('done', { task_id: taskId, peer_id: node.peerId.toString() })
  exitWith(node, 0)
}

// ---------------------------------------------------------------- owner
async function runOwner () {
  const node = await startHost()
  const pubsub = node.services.pubsub
  const me = node.peerId.toString()
  const leaseMs = seconds('lease-seconds') * 1000
  const priority = Number(opts.priority)
  const task = {
    task_id: opts['task-id'] ?? `js-${randomUUID()}`,
    task_type: opts['task-type'],
    data: JSON.parse(opts.data),
    priority,
    tags: list(opts.tags),
    requires: list(opts.requires),
    submitted_at_ms: Date.now(),
    attempt: 1,
    state: 'TASK_STATE_PENDING',
    worker: '',
    lease_id: '',
    lease_expires_at_ms: 0,
    result: null,
    error: ''
  }
  const ownerAddrs = () => node.getMultiaddrs().map(String)
  const offerOf = () => ({
    task_id: task.task_id,
    task_type: task.task_type,
    priority: task.priority,
    tags: task.tags,
    requires: task.requires,
    owner_peer_id: me,
    owner_addrs: ownerAddrs(),
    submitted_at_ms: task.submitted_at_ms,
    attempt: task.attempt
  })
  let offersPublished = 0
  let finishedAt = null

  async function publish (announcement) {
    try {
      const res = await pubsub.publish(TOPIC, encode(T.Announcement, announcement))
      return res?.recipients?.length ?? 0
    } catch (err) {
      emit('publish_failed', { message: String(err?.message ?? err) })
      return 0
    }
  }

  const announceUpdate = () => publish({
    update: {
      task_id: task.task_id,
      state: task.state,
      owner_peer_id: me,
      worker_peer_id: task.worker,
      attempt: task.attempt
    }
  })

  // An expired lease puts the task back to pending with attempt + 1 (offered again).
  function reapExpired () {
    if (task.state === 'TASK_STATE_CLAIMED' && Date.now() > task.lease_expires_at_ms) {
      emit('lease_expired', { task_id: task.task_id, worker: task.worker, attempt: task.attempt })
      Object.assign(task, {
        state: 'TASK_STATE_PENDING', worker: '', lease_id: '', lease_expires_at_ms: 0, attempt: task.attempt + 1
      })
    }
  }

  const error = (code, message) => ({ error: { code, message } })

  // Only the peer that holds the lease, with its lease id, may heartbeat / complete / fail.
  function checkLease (from, req) {
    reapExpired()
    if (req.task_id !== task.task_id) return error('ERROR_CODE_NOT_FOUND', `no task ${req.task_id}`)
    if (task.state !== 'TASK_STATE_CLAIMED') {
      return error('ERROR_CODE_NOT_LEASE_HOLDER', `task is ${task.state}, not claimed`)
    }
    if (from !== task.worker || req.lease_id !== task.lease_id) {
      return error('ERROR_CODE_NOT_LEASE_HOLDER', 'the stream peer or the lease id is not the lease holder')
    }
    return null
  }

  function answer (from, req) {
    switch (req.body) {
      case 'claim': {
        const r = req.claim
        reapExpired()
        if (r.task_id !== task.task_id) return error('ERROR_CODE_NOT_FOUND', `no task ${r.task_id}`)
        const have = new Set(r.capabilities.map((c) => c.toLowerCase()))
        if (!task.requires.every((x) => have.has(x.toLowerCase()))) {
          return error('ERROR_CODE_INCAPABLE', `requires ${task.requires.join(',')}`)
        }
        if (task.state !== 'TASK_STATE_PENDING') {
          emit('claim', { from, granted: false, task_id: r.task_id })
          return error('ERROR_CODE_ALREADY_CLAIMED', `task is ${task.state}`)
        }
        Object.assign(task, {
          state: 'TASK_STATE_CLAIMED',
          worker: from,
          lease_id: randomUUID(),
          lease_expires_at_ms: Date.now() + leaseMs
        })
        emit('claim', { from, granted: true, task_id: task.task_id, lease_id: task.lease_id, attempt: task.attempt })
        announceUpdate()
        return {
          grant: {
            task_id: task.task_id,
            lease_id: task.lease_id,
            lease_expires_at_ms: task.lease_expires_at_ms,
            task_type: task.task_type,
            data: jsonBytes(task.data),
            attempt: task.attempt
          }
        }
      }
      case 'heartbeat': {
        const refused = checkLease(from, req.heartbeat)
        if (refused) {
          emit('rejected', { op: 'heartbeat', from, code: refused.error.code })
          return refused
        }
        task.lease_expires_at_ms = Date.now() + leaseMs
        emit('heartbeat', { from, task_id: task.task_id, lease_id: task.lease_id })
        return { ack: { task_id: task.task_id, state: task.state } }
      }
      case 'complete': {
        const r = req.complete
        const refused = checkLease(from, r)
        if (refused) {
          emit('rejected', { op: 'complete', from, lease_id: r.lease_id, code: refused.error.code })
          return refused
        }
        let result
        try {
          result = parseJsonBytes(r.result)
        } catch (err) {
          return error('ERROR_CODE_BAD_REQUEST', `complete.result is not UTF-8 JSON: ${err.message}`)
        }
        Object.assign(task, { state: 'TASK_STATE_COMPLETED', result, lease_expires_at_ms: 0 })
        finishedAt = Date.now()
        emit('completed', { from, task_id: task.task_id, lease_id: r.lease_id, result, result_cid: r.result_cid })
        announceUpdate()
        return { ack: { task_id: task.task_id, state: task.state } }
      }
      case 'fail': {
        const r = req.fail
        const refused = checkLease(from, r)
        if (refused) {
          emit('rejected', { op: 'fail', from, code: refused.error.code })
          return refused
        }
        task.error = r.error
        if (r.retryable) {
          Object.assign(task, { state: 'TASK_STATE_PENDING', worker: '', lease_id: '', attempt: task.attempt + 1 })
        } else {
          Object.assign(task, { state: 'TASK_STATE_FAILED' })
          finishedAt = Date.now()
        }
        emit('failed', { from, task_id: task.task_id, error: r.error, retryable: r.retryable })
        announceUpdate()
        return { ack: { task_id: task.task_id, state: task.state } }
      }
      case 'status': {
        if (req.status.task_id !== task.task_id) return error('ERROR_CODE_NOT_FOUND', `no task ${req.status.task_id}`)
        reapExpired()
        return {
          status: {
            task_id: task.task_id,
            state: task.state,
            worker_peer_id: task.worker,
            attempt: task.attempt,
            result: task.result === null ? new Uint8Array() : jsonBytes(task.result),
            error: task.error
          }
        }
      }
      case 'list': {
        reapExpired()
        const have = new Set(req.list.capabilities.map((c) => c.toLowerCase()))
        const fits = task.requires.every((x) => have.has(x.toLowerCase()))
        return { list: { offers: task.state === 'TASK_STATE_PENDING' && fits ? [offerOf()] : [] } }
      }
      default:
        return error('ERROR_CODE_BAD_REQUEST', 'request has no body')
    }
  }

  await node.handle(PROTOCOL, async ({ stream, connection }) => {
    // The worker is the connection's authenticated peer (Noise), never a field of the message.
    const from = connection.remotePeer.toString()
    try {
      let response
      try {
        const req = decode(T.TaskRequest, await readFrame(stream, 'the request'))
        emit('request', { from, kind: req.body ?? null })
        response = answer(from, req)
      } catch (err) {
        if (/timed out|ended before/.test(String(err?.message))) throw err
        response = error('ERROR_CODE_BAD_REQUEST', String(err?.message ?? err))
      }
      await withTimeout(
        stream.sink([lp.encode.single(encode(T.TaskResponse, response))]),
        REQUEST_TIMEOUT_MS, 'writing the response'
      )
      await stream.close().catch(() => {})
    } catch (err) {
      emit('stream_error', { from, message: String(err?.message ?? err) })
      stream.abort(err)
    }
  }, { maxInboundStreams: 64 })

  pubsub.subscribe(TOPIC)
  node.addEventListener('peer:connect', (evt) => emit('peer_connected', { peer_id: evt.detail.toString() }))
  emit('ready', { role, peer_id: me, addrs: ownerAddrs(), task_id: task.task_id })

  // Offer the task every second while it is claimable (gossip is a hint and may be lost).
  const tick = setInterval(async () => {
    reapExpired()
    if (task.state === 'TASK_STATE_PENDING') {
      const recipients = await publish({ offer: offerOf() })
      offersPublished++
      if (recipients > 0 || offersPublished === 1) {
        emit('offer_published', { task_id: task.task_id, attempt: task.attempt, recipients, count: offersPublished })
      }
    }
    if (finishedAt !== null && Date.now() - finishedAt >= seconds('linger') * 1000) {
      clearInterval(tick)
      emit('done', { task_id: task.task_id, state: task.state, worker: task.worker, result: task.result })
      exitWith(node, 0)
    }
  }, 1000)

  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => { clearInterval(tick); exitWith(node, 0) })
  }
}

try {
  await (role === 'worker' ? runWorker() : runOwner())
} catch (err) {
  fail(`${role} failed: ${err?.stack ?? err}`)
}
