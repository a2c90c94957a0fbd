/*
 * Entry code of the probe guest (AT&T syntax, assembled by rustc's global_asm!).
 *
 * Two ways in, one way on:
 *   _start        64-bit Linux boot protocol: long mode, paging on with (at least) an identity
 *                 map of the low 1 GiB, RSI = boot_params. Nothing else is relied upon.
 *   pvh_start32   PVH (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off,
 *                 EBX = struct hvm_start_info. No stack is given.
 * Both end in common64 with r12 = protocol id and r13 = the boot structure's address, running
 * on our own stack, GDT and segments, with SSE enabled and .bss zeroed; then probe_main runs.
 *
 * Under this project's emulated KVM every instruction here is emulated: keep to plain ones.
 */

    .set PROTO_LINUX64, 1
    .set PROTO_PVH, 2

    .set SEL_CODE64, 0x08
    .set SEL_DATA, 0x10

/* ---------------------------------------------------------------- 64-bit Linux entry */
    .section .text.boot, "ax", @progbits
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    movq %rsi, %r13
    movl $PROTO_LINUX64, %r12d
    jmp common64

/* ---------------------------------------------------------------- PVH entry (32-bit) */
    .code32
    .globl pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    movl %ebx, %esi
    movl $boot_stack_top, %esp

    /* Boot page tables: PML4[0] -> PDPT, PDPT[0..4] -> PD0..PD3, which identity map
     * 0..4 GiB with 2 MiB pages: the low 1 GiB the common code expects, and every 32-bit
     * address hvm_start_info may point to. probe_main replaces them once it knows RAM. */
    movl $boot_pml4, %edi
    xorl %eax, %eax
    movl $2048, %ecx                /* PML4 + PDPT: 2 pages of 1024 dwords */
    rep stosl
    movl $boot_pdpt + 3, %eax       /* present | writable */
    movl %eax, boot_pml4
    movl $boot_pd + 3, %eax
    movl $boot_pdpt, %edi
    movl $4, %ecx
1:  movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b
    movl $boot_pd, %edi
    movl $0x83, %eax                /* present | writable | 2 MiB page */
    movl $2048, %ecx
2:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 2b

    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    lgdt probe_gdt_ptr
    ljmp $SEL_CODE64, $pvh_start64

    .code64
pvh_start64:
    movl %esi, %r13d                /* zero-extends: upper halves are undefined after the switch */
    movl $PROTO_PVH, %r12d
    /* fall through */

/* ---------------------------------------------------------------- common 64-bit path */
common64:
    movq $boot_stack_top, %rsp
    lgdt probe_gdt_ptr(%rip)
    pushq $SEL_CODE64
    leaq 3f(%rip), %rax
    pushq %rax
    lretq
3:  movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    /* SSE for core: CR0.EM = 0, CR0.MP = 1, CR4.OSFXSR | CR4.OSXMMEXCPT. */
    movq %cr0, %rax
    andq $~4, %rax
    orq $2, %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $0x600, %rax
    movq %rax, %cr4

    /* Zero .bss (a few hundred bytes; stacks and page tables live in .nozero). */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq

    movq %r12, %rdi
    movq %r13, %rsi
    call probe_main
4:  cli
    hlt
    jmp 4b

/* ---------------------------------------------------------------- exceptions */
    .section .text.exceptions, "ax", @progbits
    .code64

    .macro EXC_STUB vec, has_err
    .balign 16
exc_stub_\vec:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .endm

    EXC_STUB 0, 0
    EXC_STUB 1, 0
    EXC_STUB 2, 0
    EXC_STUB 3, 0
    EXC_STUB 4, 0
    EXC_STUB 5, 0
    EXC_STUB 6, 0
    EXC_STUB 7, 0
    EXC_STUB 8, 1
    EXC_STUB 9, 0
    EXC_STUB 10, 1
    EXC_STUB 11, 1
    EXC_STUB 12, 1
    EXC_STUB 13, 1
    EXC_STUB 14, 1
    EXC_STUB 15, 0
    EXC_STUB 16, 0
    EXC_STUB 17, 1
    EXC_STUB 18, 0
    EXC_STUB 19, 0
    EXC_STUB 20, 0
    EXC_STUB 21, 1
    EXC_STUB 22, 0
    EXC_STUB 23, 0
    EXC_STUB 24, 0
    EXC_STUB 25, 0
    EXC_STUB 26, 0
    EXC_STUB 27, 0
    EXC_STUB 28, 0
    EXC_STUB 29, 1
    EXC_STUB 30, 1
    EXC_STUB 31, 0

    /* On the IST stack: vector, error code, then the CPU's RIP, CS, RFLAGS, RSP, SS.
     * The CPU aligned the stack to 16 before its 5 pushes; with our 2 it is 8 off. */
exc_common:
    movq %rsp, %rdi
    subq $8, %rsp
    call probe_exception
5:  cli
    hlt
    jmp 5b

    .section .rodata.exceptions, "a", @progbits
    .balign 8
    .globl probe_exception_stubs
probe_exception_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\vec
    .endr

/* ---------------------------------------------------------------- GDT */
    .section .data.gdt, "aw", @progbits
    .balign 16
    .globl probe_gdt
probe_gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
    .quad 0, 0                      /* 0x18: 64-bit TSS descriptor, written by cpu::init */
probe_gdt_end:
    .balign 8
    .globl probe_gdt_ptr
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt                 /* 32-bit lgdt reads the low 4 bytes */

/* ---------------------------------------------------------------- PVH note */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* name size: "Xen\0" */
    .long 4                         /* desc size */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

/* ---------------------------------------------------------------- reserved, not zeroed */
    .section .nozero, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096

    /* Final page tables, filled by paging::build: PML4, PDPT, one PD per mapped GiB. */
    .globl probe_pt_pml4, probe_pt_pdpt, probe_pt_pd
probe_pt_pml4:
    .skip 4096
probe_pt_pdpt:
    .skip 4096
probe_pt_pd:
    .skip 64 * 4096                 /* paging::MAX_GIB */

    .balign 16
boot_stack:
    .skip 32768
boot_stack_top:

    .balign 16
    .skip 8192
    .globl probe_exception_stack_top
probe_exception_stack_top:
