//! An approximate prefix tree of the prompts sent to each engine (one tree per model).
//!
//! A radix tree over the prompt's bytes: each node holds a run of bytes and the set of
//! engines ("tenants") that were sent a prompt passing through it. A tenant on a node is
//! on every node above it (insertion adds it along the whole path; eviction removes whole
//! leaves), so the longest prefix an engine holds is the depth of the deepest node on the
//! path that lists it.
//!
//! "Approximate": the tree records what was routed where, not what each engine still has
//! in its KV cache (the engine may have evicted it). Memory is bounded by evicting whole
//! leaves in least-recently-used order; [`PrefixTree::bytes`] is what the tree holds:
//! the text bytes plus a fixed charge per node and per tenant entry (the bookkeeping:
//! the node itself, its entry in its parent and in the LRU index), so the cap a caller
//! enforces on it is a cap on memory, not just on text.
//!
//! Every operation is O(prompt length + path length × log) and allocation-free except for
//! the nodes it creates; nothing scans the whole tree.

use std::collections::{BTreeSet, HashMap};
use std::mem::size_of;

/// An engine, as the policy names it (the hash of its URL).
pub type Tenant = u64;

const ROOT: u32 = 0;

#[derive(Debug, Default)]
struct Node {
    /// The bytes on the edge into this node (empty only for the root and free slots).
    label: Box<[u8]>,
    parent: u32,
    /// `(first byte of the child's label, child)`, sorted by byte.
    children: Vec<(u8, u32)>,
    /// The engines whose routed prompts pass through this node.
    tenants: Vec<Tenant>,
    /// Logical time of the last insertion through this node.
    last: u64,
}

/// Charged per node besides its text: the node, its parent's child entry, its LRU entry
/// (a B-tree entry costs about twice its payload).
pub const NODE_COST: usize =
    size_of::<Node>() + size_of::<(u8, u32)>() + 2 * size_of::<(u64, u32)>();
/// Charged per tenant listed on a node (the entry, plus its share of per-tenant totals).
pub const TENANT_COST: usize = 2 * size_of::<Tenant>();

#[derive(Debug)]
pub struct PrefixTree {
    /// Arena; index 0 is the root. Freed slots are reused from `free`.
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// `(last, node)` for every non-root node without children: the eviction order.
    leaves: BTreeSet<(u64, u32)>,
    /// Per tenant, the text bytes on the nodes that list it (its share of the tree).
    held: HashMap<Tenant, usize>,
    bytes: usize,
}

impl Default for PrefixTree {
    fn default() -> Self {
        Self::new()
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    // Compare 8 bytes at a time, then finish bytewise.
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_ne_bytes(a[i..i + 8].try_into().unwrap_or([0; 8]));
        let y = u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        if x != y {
            break;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

impl PrefixTree {
    pub fn new() -> Self {
        PrefixTree {
            nodes: vec![Node::default()],
            free: Vec::new(),
            leaves: BTreeSet::new(),
            held: HashMap::new(),
            bytes: 0,
        }
    }

    /// Memory charged to the tree's contents (text plus bookkeeping), in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Text bytes on the nodes that list `tenant`.
    pub fn held(&self, tenant: Tenant) -> usize {
        self.held.get(&tenant).copied().unwrap_or(0)
    }

    /// Live nodes, the root excluded.
    pub fn nodes(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }

    /// The logical time of the least recently used leaf, if any.
    pub fn oldest(&self) -> Option<u64> {
        self.leaves.first().map(|&(t, _)| t)
    }

    fn child(&self, node: u32, byte: u8) -> Option<u32> {
        let c = &self.nodes[node as usize].children;
        c.binary_search_by_key(&byte, |&(b, _)| b)
            .ok()
            .map(|i| c[i].1)
    }

    /// For every tenant on the path of `text`, how many of its leading bytes the tenant
    /// holds (`out` is cleared first; tenants holding nothing are absent).
    pub fn match_tenants(&self, text: &[u8], out: &mut Vec<(Tenant, usize)>) {
        out.clear();
        let (mut node, mut pos) = (ROOT, 0);
        while pos < text.len() {
            let Some(child) = self.child(node, text[pos]) else {
                break;
            };
            let n = &self.nodes[child as usize];
            let k = common_prefix(&n.label, &text[pos..]);
            pos += k;
            for &t in &n.tenants {
                match out.iter_mut().find(|(x, _)| *x == t) {
                    Some(e) => e.1 = pos,
                    None => out.push((t, pos)),
                }
            }
            if k < n.label.len() {
                break;
            }
            node = child;
        }
    }

    /// Record that `text` was sent to `tenant` at logical time `now` (which should not go
    /// backwards). Returns the bytes the tree grew by.
    pub fn insert(&mut self, text: &[u8], tenant: Tenant, now: u64) -> usize {
        let before = self.bytes;
        let (mut node, mut pos) = (ROOT, 0);
        while pos < text.len() {
            match self.child(node, text[pos]) {
                None => {
                    self.new_leaf(node, &text[pos..], tenant, now);
                    break;
                }
                Some(child) => {
                    let k = common_prefix(&self.nodes[child as usize].label, &text[pos..]);
                    let child = if k < self.nodes[child as usize].label.len() {
                        self.split(child, k)
                    } else {
                        child
                    };
                    self.touch(child, tenant, now);
                    pos += k;
                    node = child;
                }
            }
        }
        self.bytes - before
    }

    fn alloc(&mut self, n: Node) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = n;
                i
            }
            None => {
                self.nodes.push(n);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn new_leaf(&mut self, parent: u32, label: &[u8], tenant: Tenant, now: u64) {
        let first = label[0];
        let len = label.len();
        let id = self.alloc(Node {
            label: label.into(),
            parent,
            children: Vec::new(),
            tenants: vec![tenant],
            last: now,
        });
        let p = &mut self.nodes[parent as usize];
        if parent != ROOT && p.children.is_empty() {
            self.leaves.remove(&(p.last, parent));
        }
        let at = p.children.partition_point(|&(b, _)| b < first);
        p.children.insert(at, (first, id));
        self.leaves.insert((now, id));
        self.bytes += len + NODE_COST + TENANT_COST;
        *self.held.entry(tenant).or_default() += len;
    }

    /// Split `id` after `k` bytes of its label (0 < k < len): a new node takes the first
    /// `k` bytes, the same tenants and time, and `id` becomes its only child.
    fn split(&mut self, id: u32, k: usize) -> u32 {
        let n = &mut self.nodes[id as usize];
        let head: Box<[u8]> = n.label[..k].into();
        let tail: Box<[u8]> = n.label[k..].into();
        let first = head[0];
        let (parent, tenants, last) = (n.parent, n.tenants.clone(), n.last);
        n.label = tail;
        let tail_first = n.label[0];
        let tenant_count = tenants.len();
        let mid = self.alloc(Node {
            label: head,
            parent,
            children: vec![(tail_first, id)],
            tenants,
            last,
        });
        self.nodes[id as usize].parent = mid;
        let pc = &mut self.nodes[parent as usize].children;
        if let Ok(i) = pc.binary_search_by_key(&first, |&(b, _)| b) {
            pc[i].1 = mid;
        }
        self.bytes += NODE_COST + TENANT_COST * tenant_count;
        mid
    }

    fn touch(&mut self, id: u32, tenant: Tenant, now: u64) {
        let n = &mut self.nodes[id as usize];
        if n.children.is_empty() && n.last != now {
            self.leaves.remove(&(n.last, id));
            self.leaves.insert((now, id));
        }
        n.last = now;
        if !n.tenants.contains(&tenant) {
            n.tenants.push(tenant);
            let len = n.label.len();
            self.bytes += TENANT_COST;
            *self.held.entry(tenant).or_default() += len;
        }
    }

    /// Remove the least recently used leaf; returns the bytes freed (0: empty tree).
    pub fn evict_lru(&mut self) -> usize {
        let Some((_, id)) = self.leaves.pop_first() else {
            return 0;
        };
        let n = std::mem::take(&mut self.nodes[id as usize]);
        let freed = n.label.len() + NODE_COST + TENANT_COST * n.tenants.len();
        for t in &n.tenants {
            if let Some(h) = self.held.get_mut(t) {
                *h = h.saturating_sub(n.label.len());
                if *h == 0 {
                    self.held.remove(t);
                }
            }
        }
        let parent = n.parent;
        let p = &mut self.nodes[parent as usize];
        if let Ok(i) = p.children.binary_search_by_key(&n.label[0], |&(b, _)| b) {
            p.children.remove(i);
        }
        if parent != ROOT && p.children.is_empty() {
            self.leaves.insert((p.last, parent));
        }
        self.free.push(id);
        self.bytes -= freed;
        freed
    }

    /// Check every invariant against a recomputation (tests).
    #[cfg(test)]
    pub fn check(&self) {
        let mut bytes = 0;
        let mut held: HashMap<Tenant, usize> = HashMap::new();
        let mut leaves = BTreeSet::new();
        let mut stack = vec![ROOT];
        let mut seen = 0;
        while let Some(id) = stack.pop() {
            let n = &self.nodes[id as usize];
            if id != ROOT {
                seen += 1;
                assert!(!n.label.is_empty());
                bytes += n.label.len() + NODE_COST + TENANT_COST * n.tenants.len();
                for t in &n.tenants {
                    *held.entry(*t).or_default() += n.label.len();
                }
                let p = &self.nodes[n.parent as usize];
                if n.parent != ROOT {
                    assert!(n.tenants.iter().all(|t| p.tenants.contains(t)));
                    assert!(p.last >= n.last);
                }
                if n.children.is_empty() {
                    leaves.insert((n.last, id));
                }
            }
            assert!(n.children.windows(2).all(|w| w[0].0 < w[1].0));
            for &(b, c) in &n.children {
                assert_eq!(self.nodes[c as usize].label[0], b);
                assert_eq!(self.nodes[c as usize].parent, id);
                stack.push(c);
            }
        }
        assert_eq!(seen, self.nodes());
        assert_eq!(bytes, self.bytes);
        assert_eq!(held, self.held);
        assert_eq!(leaves, self.leaves);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(t: &PrefixTree, text: &str) -> Vec<(Tenant, usize)> {
        let mut out = Vec::new();
        t.match_tenants(text.as_bytes(), &mut out);
        out.sort();
        out
    }

    #[test]
    fn longest_prefix_per_tenant() {
        let mut t = PrefixTree::new();
        t.insert(b"hello world", 1, 1);
        t.insert(b"hello there", 2, 2);
        t.insert(b"hello world, again", 1, 3);
        t.check();
        assert_eq!(matches(&t, "hello world, again!"), vec![(1, 18), (2, 6)]);
        assert_eq!(matches(&t, "hello th"), vec![(1, 6), (2, 8)]);
        assert_eq!(matches(&t, "help"), vec![(1, 3), (2, 3)]);
        assert_eq!(matches(&t, "xyz"), vec![]);
        assert_eq!(matches(&t, ""), vec![]);
        // Shared prefixes are stored once.
        assert_eq!(t.held(1), "hello world, again".len());
        assert_eq!(t.held(2), "hello there".len());
        // The same text again for another tenant adds only tenant entries.
        let grew = t.insert(b"hello there", 1, 4);
        assert_eq!(grew, TENANT_COST);
        assert_eq!(matches(&t, "hello there"), vec![(1, 11), (2, 11)]);
        t.check();
    }

    #[test]
    fn multibyte_text_is_fine() {
        let mut t = PrefixTree::new();
        t.insert("héllo wörld".as_bytes(), 7, 1);
        t.insert("héllo wäld".as_bytes(), 8, 2);
        t.check();
        let m = matches(&t, "héllo wörld");
        assert_eq!(m[0], (7, "héllo wörld".len()));
        assert!(m[1].1 < "héllo wö".len());
    }

    #[test]
    fn evicts_least_recently_used_leaves_first() {
        let mut t = PrefixTree::new();
        t.insert(b"system: a; user one", 1, 1);
        t.insert(b"system: a; user two", 2, 2);
        t.insert(b"system: a; user one, more", 1, 3);
        t.check();
        // The oldest leaf is "two" (time 2): "one"'s path was refreshed at time 3.
        let freed = t.evict_lru();
        assert!(freed >= 3 + NODE_COST);
        t.check();
        assert_eq!(matches(&t, "system: a; user two"), vec![(1, 16), (2, 16)]);
        assert_eq!(
            matches(&t, "system: a; user one, more"),
            vec![(1, 25), (2, 16)]
        );
        while t.evict_lru() > 0 {
            t.check();
        }
        assert_eq!((t.bytes(), t.nodes()), (0, 0));
        assert!(t.held.is_empty());
        // Slots are reused.
        let slots = t.nodes.len();
        t.insert(b"again", 3, 9);
        assert_eq!(t.nodes.len(), slots);
        t.check();
    }

    #[test]
    fn random_streams_keep_invariants() {
        // A small deterministic generator: prompts share prefixes of varied lengths.
        let mut s = 0x1234_5678_u64;
        let mut next = move || {
            s = kv_events::hash::mix64(s);
            s
        };
        let mut t = PrefixTree::new();
        let bases: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                (0..200)
                    .map(|j| b'a' + ((i * 7 + j * 3) % 26) as u8)
                    .collect()
            })
            .collect();
        for now in 1..3000u64 {
            let r = next();
            let base = &bases[(r % 8) as usize];
            let cut = ((r >> 8) % 200) as usize + 1;
            let mut text = base[..cut].to_vec();
            text.extend((0..(r >> 20) % 30).map(|k| b'0' + ((r >> k) % 10) as u8));
            t.insert(&text, (r >> 40) % 4, now);
            let mut out = Vec::new();
            t.match_tenants(&text, &mut out);
            assert!(out
                .iter()
                .any(|&(x, l)| x == (r >> 40) % 4 && l == text.len()));
            if r % 5 == 0 {
                t.evict_lru();
            }
            if now % 97 == 0 {
                t.check();
            }
        }
        t.check();
    }
}
