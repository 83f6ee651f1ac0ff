//! Helpers shared by the KVM and CLI tests: a minimal ELF "kernel" around hand-assembled
//! x86_64 machine code, and configurations for it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Where the payload is loaded and entered (physical = virtual under our identity map).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Reads the zero page where Linux finds it (`rsi`) and writes out COM1, in order:
/// `e820_entries` (1 byte), the e820 table (20 bytes each), `hdr.cmd_line_ptr` (4 bytes),
/// the command line up to and including its NUL, then the 32-bit value read by MMIO from
/// 0xd000_0000 (the first virtio-mmio slot); finally resets through the i8042.
///
/// ```text
///     mov rbx, rsi ; mov dx, 0x3f8
///     mov al, [rbx+0x1e8] ; out dx, al
///     movzx ecx, byte [rbx+0x1e8] ; imul ecx, ecx, 20 ; lea rsi, [rbx+0x2d0]
/// 1:  mov al, [rsi] ; out dx, al ; inc rsi ; dec ecx ; jnz 1b
///     lea rsi, [rbx+0x228] ; mov ecx, 4
/// 2:  mov al, [rsi] ; out dx, al ; inc rsi ; dec ecx ; jnz 2b
///     mov esi, [rbx+0x228]
/// 3:  mov al, [rsi] ; out dx, al ; inc rsi ; test al, al ; jnz 3b
///     mov edi, 0xd0000000 ; mov eax, [rdi] ; mov ecx, 4
/// 4:  out dx, al ; shr eax, 8 ; dec ecx ; jnz 4b
///     mov al, 0xfe ; out 0x64, al
/// 5:  hlt ; jmp 5b
/// ```
pub const ZERO_PAGE_REPORTER: &[u8] = &[
    0x48, 0x89, 0xf3, 0x66, 0xba, 0xf8, 0x03, 0x8a, 0x83, 0xe8, 0x01, 0x00, 0x00, 0xee, 0x0f, 0xb6,
    0x8b, 0xe8, 0x01, 0x00, 0x00, 0x6b, 0xc9, 0x14, 0x48, 0x8d, 0xb3, 0xd0, 0x02, 0x00, 0x00, 0x8a,
    0x06, 0xee, 0x48, 0xff, 0xc6, 0xff, 0xc9, 0x75, 0xf6, 0x48, 0x8d, 0xb3, 0x28, 0x02, 0x00, 0x00,
    0xb9, 0x04, 0x00, 0x00, 0x00, 0x8a, 0x06, 0xee, 0x48, 0xff, 0xc6, 0xff, 0xc9, 0x75, 0xf6, 0x8b,
    0xb3, 0x28, 0x02, 0x00, 0x00, 0x8a, 0x06, 0xee, 0x48, 0xff, 0xc6, 0x84, 0xc0, 0x75, 0xf6, 0xbf,
    0x00, 0x00, 0x00, 0xd0, 0x8b, 0x07, 0xb9, 0x04, 0x00, 0x00, 0x00, 0xee, 0xc1, 0xe8, 0x08, 0xff,
    0xc9, 0x75, 0xf8, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];

/// Writes "Hello from the guest\n" to COM1 byte by byte, then resets through the i8042.
///
/// ```text
///     mov dx, 0x3f8 ; lea rsi, [rip+msg]
/// 1:  mov al, [rsi] ; test al, al ; jz 2f ; out dx, al ; inc rsi ; jmp 1b
/// 2:  mov al, 0xfe ; out 0x64, al
/// 3:  hlt ; jmp 3b
/// msg: .asciz "Hello from the guest\n"
/// ```
pub const HELLO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35, 0x13, 0x00, 0x00, 0x00, 0x8a, 0x06, 0x84, 0xc0, 0x74,
    0x06, 0xee, 0x48, 0xff, 0xc6, 0xeb, 0xf4, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd, 0x48, 0x65,
    0x6c, 0x6c, 0x6f, 0x20, 0x66, 0x72, 0x6f, 0x6d, 0x20, 0x74, 0x68, 0x65, 0x20, 0x67, 0x75, 0x65,
    0x73, 0x74, 0x0a, 0x00,
];

/// Writes 'H' to COM1, then halts forever with interrupts off.
///
/// ```text
///     mov dx, 0x3f8 ; mov al, 'H' ; out dx, al ; cli
/// 1:  hlt ; jmp 1b
/// ```
pub const HALT_FOREVER: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xfa, 0xf4, 0xeb, 0xfd,
];

/// Writes 'T' to COM1, then `ud2` with an empty IDT: a triple fault.
///
/// ```text
///     mov dx, 0x3f8 ; mov al, 'T' ; out dx, al ; ud2
/// ```
pub const TRIPLE_FAULT: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x54, 0xee, 0x0f, 0x0b];

/// A minimal x86_64 ELF executable: one PT_LOAD of `code` at [`LOAD_ADDR`], entered there.
pub fn elf_with(code: &[u8]) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    let mut f = Vec::new();
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    assert_eq!(f.len(), 64);
    // Program header.
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R + X
    f.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(CODE_OFFSET as usize, 0);
    f.extend_from_slice(code);
    f
}

/// Writes the ELF for `code` into `dir` and returns its path.
pub fn write_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    let path = dir.join("vmlinux");
    std::fs::write(&path, elf_with(code)).unwrap();
    path
}

/// A JSON configuration for a payload kernel in `dir`, console to `dir/console.log`.
pub fn config_json(dir: &Path, kernel: &Path, extra: &str) -> String {
    format!(
        r#"{{"vcpus": 1, "mem_size_mib": 64, "kernel": "{}",
            "cmdline": "console=ttyS0 carapace.test=1",
            "serial": {{"file": "{}"}}{extra}}}"#,
        kernel.display(),
        dir.join("console.log").display()
    )
}

/// Fails (never skips) when there is no KVM.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the KVM tests need it and do not skip"
    );
}
