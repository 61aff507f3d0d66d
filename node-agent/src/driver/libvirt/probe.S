# The domain-type probe guest: a boot sector that enters long mode, spins through a short
# compute loop, and writes a marker on the first serial port. It shows that a domain type
# really runs guest code (a KVM that advertises itself but cannot run guests never prints)
# and how fast. `probe.rs` embeds the assembled bytes; rebuild them with
#   as --32 -o probe.o probe.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o probe.bin probe.o
    .code16
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    # identity-map the first 2 MiB: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000
    movw $0x1000, %di
    xorl %eax, %eax
    movw $0x0c00, %cx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x0083, 0x3000
    lgdt gdtr
    movl %cr4, %eax
    orl $0x20, %eax             # CR4.PAE
    movl %eax, %cr4
    movl $0x1000, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      # EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       # CR0.PG | CR0.PE: straight into long mode
    movl %eax, %cr0
    ljmpl $0x08, $long_mode
    .code64
long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %ss
    movl $50000000, %ecx        # a compute loop with a memory write per turn
    movq $0x5000, %rdi
3:  addq %rcx, (%rdi)
    decl %ecx
    jnz 3b
    leaq msg(%rip), %rsi
    movw $0x3f8, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  hlt
    jmp 2b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    # 64-bit code
    .quad 0x00cf92000000ffff    # data
gdtr:
    .word gdtr - gdt - 1
    .long gdt
msg:
    .asciz "UPDRAFT-PROBE-OK\r\n"
    .org 510
    .word 0xaa55
