//! The allowlist filter as a binary search over the allowed system call numbers.
//!
//! seccompiler compiles an allowlist into a chain: one comparison (and its jump trampolines)
//! after another, about four instructions per call, 700 for usernet's list. The kernel pays
//! for the length at each start, in the confinement step: it checks and translates the
//! program, JIT-compiles it, and runs it once for every system call number of the
//! architecture, to find the calls it allows whatever their arguments (the filter cache that
//! lets those calls skip the filter later). With the chain that took 0.5-0.6 ms of
//! `usernet run -- true` (`strace -T`).
//!
//! Here the sorted numbers become a balanced tree of `JGE` jumps down to leaves of at most
//! [`LEAF`] numbers compared one by one: about 1.6 instructions per call, and about ten run
//! for any number, where the chain ran up to 700. What it answers is the chain's: the
//! architecture checked first (another one kills the process, as seccompiler's does), then
//! `allow` for a listed number and `other` for any other, x32's numbers (bit 30 set) and
//! -1 included. The argument filters, which compare arguments, stay seccompiler's.

use seccompiler::{BpfProgram, sock_filter};

/// The architecture's audit value (linux/audit.h), as seccomp_data.arch carries it.
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "riscv64")]
pub const AUDIT_ARCH: u32 = 243 | 0x8000_0000 | 0x4000_0000;

/// Offsets in struct seccomp_data.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Numbers a leaf compares one by one.
const LEAF: usize = 4;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The program: `allow` (a SECCOMP_RET_* value) for the numbers of `allowed`, `other` for
/// any other number, the process killed for another architecture than `arch`. The few
/// numbers of `first` get their own answer instead, checked before the search.
pub fn allowlist(arch: u32, first: &[(u32, u32)], allowed: &[u32], allow: u32, other: u32) -> BpfProgram {
    let mut numbers = allowed.to_vec();
    numbers.sort_unstable();
    numbers.dedup();
    let mut program = vec![
        stmt(LD_W_ABS, ARCH_OFFSET),
        jump(JEQ_K, arch, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, NR_OFFSET),
    ];
    for &(nr, answer) in first {
        program.push(jump(JEQ_K, nr, 0, 1));
        program.push(stmt(RET_K, answer));
    }
    program.extend(search(&numbers, allow, other));
    program
}

/// The instructions that answer for the number in the accumulator, `numbers` sorted. Every
/// path ends in a return inside them, and every jump goes forward, as classic BPF requires.
fn search(numbers: &[u32], allow: u32, other: u32) -> Vec<sock_filter> {
    if numbers.is_empty() {
        return vec![stmt(RET_K, other)];
    }
    if numbers.len() <= LEAF {
        let mut leaf = Vec::with_capacity(numbers.len() + 2);
        for (i, &n) in numbers.iter().enumerate() {
            // Over the comparisons left and the `other` return, to `allow`.
            let to_allow = (numbers.len() - i) as u8;
            leaf.push(jump(JEQ_K, n, to_allow, 0));
        }
        leaf.push(stmt(RET_K, other));
        leaf.push(stmt(RET_K, allow));
        return leaf;
    }
    let mid = numbers.len() / 2;
    let below = search(&numbers[..mid], allow, other);
    let above = search(&numbers[mid..], allow, other);
    let mut node = Vec::with_capacity(below.len() + above.len() + 2);
    match u8::try_from(below.len()) {
        Ok(skip) => node.push(jump(JGE_K, numbers[mid], skip, 0)),
        // A jump's offsets are 8 bits: over a longer subtree, through an unconditional jump.
        Err(_) => {
            node.push(jump(JGE_K, numbers[mid], 0, 1));
            node.push(stmt(JA, below.len() as u32));
        }
    }
    node.extend(below);
    node.extend(above);
    node
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// What the kernel would answer: runs a classic BPF program that looks only at
    /// seccomp_data's `nr` and `arch`, as allowlists do. Only the instructions allowlists
    /// use; any other fails the test, as does a jump out of the program.
    pub fn run(program: &[sock_filter], nr: u32, arch: u32) -> u32 {
        let mut data = [0u8; 8];
        data[..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..].copy_from_slice(&arch.to_ne_bytes());
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let ins = program.get(pc).unwrap_or_else(|| panic!("ran off the program at {pc}"));
            let cond = |taken: bool| pc + 1 + if taken { ins.jt as usize } else { ins.jf as usize };
            pc = match ins.code {
                LD_W_ABS => {
                    let at = ins.k as usize;
                    acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                    pc + 1
                }
                JEQ_K => cond(acc == ins.k),
                JGE_K => cond(acc >= ins.k),
                JA => pc + 1 + ins.k as usize,
                RET_K => return ins.k,
                code => panic!("instruction {code:#x} at {pc} not interpreted"),
            };
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const OTHER: u32 = libc::SECCOMP_RET_TRAP;

    /// Every number worth asking about: the real ones, x32's (bit 30 set), and -1's kin.
    pub fn every_number() -> impl Iterator<Item = u32> {
        (0..1100).chain(0x4000_0000..0x4000_0000 + 1100).chain([u32::MAX, u32::MAX - 1, 0x8000_0000])
    }

    #[test]
    fn answers_allow_for_exactly_the_listed_numbers() {
        // Sizes around the leaf's and the 8-bit jump's limits, gaps and neighbours.
        for count in [0usize, 1, 2, 3, 4, 5, 8, 9, 17, 100, 300, 700] {
            let listed: Vec<u32> = (0..count as u32).map(|i| i * 3 + (i % 2)).collect();
            let program = allowlist(AUDIT_ARCH, &[], &listed, ALLOW, OTHER);
            assert!(program.len() <= 6 + count * 5 / 2, "{count} numbers took {} instructions", program.len());
            for nr in every_number() {
                let want = if listed.contains(&nr) { ALLOW } else { OTHER };
                assert_eq!(run(&program, nr, AUDIT_ARCH), want, "{count} numbers, nr {nr:#x}");
            }
        }
    }

    #[test]
    fn another_architecture_is_killed() {
        let program = allowlist(AUDIT_ARCH, &[], &[0, 1, 2], ALLOW, OTHER);
        for arch in [0, AUDIT_ARCH ^ 1, 0x4000_0003 /* i386 */] {
            assert_eq!(run(&program, 1, arch), libc::SECCOMP_RET_KILL_PROCESS);
        }
    }

    #[test]
    fn unsorted_and_repeated_numbers_are_taken_as_a_set_and_first_answers_go_first() {
        const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let first = [(7, ENOSYS), (8, ENOSYS)];
        let program = allowlist(AUDIT_ARCH, &first, &[9, 3, 9, 1, 3, 7, 5, 5, 11], ALLOW, OTHER);
        for nr in 0..20 {
            let want = if [7, 8].contains(&nr) {
                ENOSYS
            } else if [1, 3, 5, 9, 11].contains(&nr) {
                ALLOW
            } else {
                OTHER
            };
            assert_eq!(run(&program, nr, AUDIT_ARCH), want, "nr {nr}");
        }
    }

    #[test]
    fn long_subtrees_are_jumped_over() {
        // 700 numbers: the root's lower subtree is longer than an 8-bit offset.
        let listed: Vec<u32> = (0..700).map(|i| i * 2).collect();
        let program = allowlist(AUDIT_ARCH, &[], &listed, ALLOW, OTHER);
        assert!(program.iter().any(|i| i.code == JA), "no long jump in {} instructions", program.len());
        assert!(program.len() < 4096, "over the kernel's BPF_MAXINSNS");
    }
}
