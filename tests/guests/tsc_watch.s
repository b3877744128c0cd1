; Reads the TSC in a loop and reports the largest step between two readings and how often it
; went backwards: across a suspend and resume, the TSC must continue, not jump by the time the
; guest spent suspended nor run backwards. ITERATIONS comes from --guest-arg iterations=N.
.equ COM1, 0x3f8
.equ PM1A_CNT, 0x404
.org 0x100000
start:  rdtsc
        shl rdx, 32
        or rax, rdx
        mov r8, rax             ; previous reading
        mov r9, 0               ; largest step
        mov r10, 0              ; readings that went backwards
        movabs r11, iterations
loop:   rdtsc
        shl rdx, 32
        or rax, rdx
        cmp rax, r8
        jae forward
        inc r10
        jmp next
forward:
        mov rbx, rax
        sub rbx, r8
        cmp rbx, r9
        jbe next
        mov r9, rbx
next:   mov r8, rax
        dec r11
        jnz loop
        mov rax, 'S'
        out8 COM1, rax
        mov rax, ' '
        out8 COM1, rax
        call hex
        mov rax, ' '
        out8 COM1, rax
        mov rax, 'B'
        out8 COM1, rax
        mov rax, ' '
        out8 COM1, rax
        mov r9, r10
        call hex
        mov rax, 10
        out8 COM1, rax
        mov rax, 0x3400
        out16 PM1A_CNT, rax
        cli
        hlt
; print r9 as 16 hex digits
hex:    mov rcx, 16
hexloop:
        mov rax, r9
        shr rax, 60
        cmp rax, 10
        jb decimal
        add rax, 87
        jmp emit
decimal:
        add rax, 48
emit:   out8 COM1, rax
        shl r9, 4
        dec rcx
        jnz hexloop
        ret
